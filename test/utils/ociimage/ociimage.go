// Package ociimage reads the image archive hack/image.sh writes (an OCI
// image layout with a docker-archive manifest.json beside it): it checks
// every digest and size from the index down, as a runtime pulling it would,
// and unpacks the root filesystem as a runtime does before starting a
// container, for the tests that run the proxy from the image.
package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Descriptor, Manifest, Index and Config are the parts of the OCI image
// spec an archive holds.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

type Index struct {
	SchemaVersion int          `json:"schemaVersion"`
	Manifests     []Descriptor `json:"manifests"`
}

type Config struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		Entrypoint []string `json:"Entrypoint"`
		Cmd        []string `json:"Cmd"`
		Env        []string `json:"Env"`
		WorkingDir string   `json:"WorkingDir"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// DockerManifest is one entry of a docker-archive's manifest.json.
type DockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// Image is an archive whose OCI layout and docker manifest were checked.
type Image struct {
	Path string
	// Name is the index's io.containerd.image.name.
	Name           string
	ManifestDigest string
	Manifest       Manifest
	Config         Config
	Docker         DockerManifest
	// files holds the archive's small files and the offsets of its blobs.
	files map[string][]byte
}

const maxSmall = 1 << 20

// Open reads the archive and checks it: oci-layout, index.json naming one
// manifest, the manifest, its config and every layer present with the
// digest and size their descriptors give, each layer's uncompressed digest
// equal to the config's diff_id, and manifest.json naming the same config
// and layers.
func Open(archive string) (*Image, error) {
	img := &Image{Path: archive, files: map[string][]byte{}}
	digests := map[string]string{} // name -> sha256 of its content
	sizes := map[string]int64{}
	f, err := os.Open(archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", archive, err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		h := sha256.New()
		var small bytes.Buffer
		w := io.Writer(h)
		if hdr.Size <= maxSmall {
			w = io.MultiWriter(h, &small)
		}
		n, err := io.Copy(w, tr)
		if err != nil {
			return nil, fmt.Errorf("reading %s in %s: %w", hdr.Name, archive, err)
		}
		digests[hdr.Name] = "sha256:" + hex.EncodeToString(h.Sum(nil))
		sizes[hdr.Name] = n
		if hdr.Size <= maxSmall {
			img.files[hdr.Name] = small.Bytes()
		}
	}
	blob := func(d Descriptor) ([]byte, error) {
		name := "blobs/" + strings.Replace(d.Digest, ":", "/", 1)
		got, ok := digests[name]
		switch {
		case !ok:
			return nil, fmt.Errorf("%s (%s) is missing", name, d.MediaType)
		case got != d.Digest:
			return nil, fmt.Errorf("%s holds %s, not what its name says", name, got)
		case sizes[name] != d.Size:
			return nil, fmt.Errorf("%s is %d bytes, its descriptor says %d", name, sizes[name], d.Size)
		}
		return img.files[name], nil
	}
	var layout struct {
		ImageLayoutVersion string `json:"imageLayoutVersion"`
	}
	if err := json.Unmarshal(img.files["oci-layout"], &layout); err != nil || layout.ImageLayoutVersion != "1.0.0" {
		return nil, fmt.Errorf("oci-layout: want imageLayoutVersion 1.0.0 (%v)", err)
	}
	var index Index
	if err := json.Unmarshal(img.files["index.json"], &index); err != nil {
		return nil, fmt.Errorf("index.json: %w", err)
	}
	if index.SchemaVersion != 2 || len(index.Manifests) != 1 {
		return nil, fmt.Errorf("index.json: want schemaVersion 2 and one manifest, have %d and %d", index.SchemaVersion, len(index.Manifests))
	}
	md := index.Manifests[0]
	img.ManifestDigest = md.Digest
	img.Name = md.Annotations["io.containerd.image.name"]
	b, err := blob(md)
	if err != nil {
		return nil, fmt.Errorf("the manifest: %w", err)
	}
	if err := json.Unmarshal(b, &img.Manifest); err != nil {
		return nil, fmt.Errorf("the manifest: %w", err)
	}
	if img.Manifest.MediaType != md.MediaType {
		return nil, fmt.Errorf("the manifest's media type %q, the index says %q", img.Manifest.MediaType, md.MediaType)
	}
	if b, err = blob(img.Manifest.Config); err != nil {
		return nil, fmt.Errorf("the config: %w", err)
	}
	if err := json.Unmarshal(b, &img.Config); err != nil {
		return nil, fmt.Errorf("the config: %w", err)
	}
	if len(img.Config.RootFS.DiffIDs) != len(img.Manifest.Layers) {
		return nil, fmt.Errorf("%d layers, %d diff_ids", len(img.Manifest.Layers), len(img.Config.RootFS.DiffIDs))
	}
	for i, l := range img.Manifest.Layers {
		if _, err := blob(l); err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		diffID, err := img.layerDigest(l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		if diffID != img.Config.RootFS.DiffIDs[i] {
			return nil, fmt.Errorf("layer %d unpacks to %s, the config's diff_id is %s", i, diffID, img.Config.RootFS.DiffIDs[i])
		}
	}
	var docker []DockerManifest
	if err := json.Unmarshal(img.files["manifest.json"], &docker); err != nil || len(docker) != 1 {
		return nil, fmt.Errorf("manifest.json: want one image (%v)", err)
	}
	img.Docker = docker[0]
	if want := "blobs/" + strings.Replace(img.Manifest.Config.Digest, ":", "/", 1); img.Docker.Config != want {
		return nil, fmt.Errorf("manifest.json's config is %s, the OCI manifest's %s", img.Docker.Config, want)
	}
	if len(img.Docker.Layers) != len(img.Manifest.Layers) {
		return nil, fmt.Errorf("manifest.json names %d layers, the OCI manifest %d", len(img.Docker.Layers), len(img.Manifest.Layers))
	}
	for i, l := range img.Manifest.Layers {
		if want := "blobs/" + strings.Replace(l.Digest, ":", "/", 1); img.Docker.Layers[i] != want {
			return nil, fmt.Errorf("manifest.json's layer %d is %s, the OCI manifest's %s", i, img.Docker.Layers[i], want)
		}
	}
	return img, nil
}

// layer opens one layer's uncompressed tar stream; close closes the
// archive.
func (img *Image) layer(l Descriptor) (r io.Reader, closeFn func() error, err error) {
	f, err := os.Open(img.Path)
	if err != nil {
		return nil, nil, err
	}
	name := "blobs/" + strings.Replace(l.Digest, ":", "/", 1)
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("finding %s: %w", name, err)
		}
		if hdr.Name == name {
			break
		}
	}
	if !strings.HasSuffix(l.MediaType, "+gzip") && !strings.HasSuffix(l.MediaType, ".gzip") {
		return tr, f.Close, nil
	}
	gz, err := gzip.NewReader(tr)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return gz, func() error { gz.Close(); return f.Close() }, nil
}

func (img *Image) layerDigest(l Descriptor) (string, error) {
	r, closeFn, err := img.layer(l)
	if err != nil {
		return "", err
	}
	defer closeFn()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// File is one entry of the layers, as Files lists it.
type File struct {
	Name     string // without a leading "/"
	Type     byte
	Mode     int64
	Uid, Gid int
	Size     int64
	Linkname string
	ModTime  time.Time
}

// Files lists every entry of every layer, in order.
func (img *Image) Files() ([]File, error) {
	var files []File
	for _, l := range img.Manifest.Layers {
		r, closeFn, err := img.layer(l)
		if err != nil {
			return nil, err
		}
		tr := tar.NewReader(r)
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				closeFn()
				return nil, err
			}
			files = append(files, File{Name: strings.TrimSuffix(path.Clean(hdr.Name), "/"), Type: hdr.Typeflag,
				Mode: hdr.Mode, Uid: hdr.Uid, Gid: hdr.Gid, Size: hdr.Size, Linkname: hdr.Linkname, ModTime: hdr.ModTime})
		}
		closeFn()
	}
	return files, nil
}

// Unpack extracts the layers into dir (which must be empty or missing),
// keeping owners, modes, links and hard links, as a runtime's snapshotter
// does. It needs root for the owners.
func (img *Image) Unpack(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for _, l := range img.Manifest.Layers {
		r, closeFn, err := img.layer(l)
		if err != nil {
			return err
		}
		err = unpackLayer(tar.NewReader(r), root)
		closeFn()
		if err != nil {
			return fmt.Errorf("unpacking %s: %w", l.Digest, err)
		}
	}
	return nil
}

type dirTime struct {
	path string
	t    time.Time
}

func unpackLayer(tr *tar.Reader, root string) error {
	var dirs []dirTime
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		name := path.Clean("/" + hdr.Name)
		if strings.HasPrefix(path.Base(name), ".wh.") {
			return fmt.Errorf("%s: whiteouts are not supported (the image has one layer)", hdr.Name)
		}
		target := filepath.Join(root, name)
		if name == "/" {
			continue
		}
		// Nothing may write through a link to outside root: a parent
		// that is a symlink is refused.
		if err := checkParents(root, target); err != nil {
			return err
		}
		mode := os.FileMode(hdr.Mode & 0o777)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(target, 0o700); err != nil && !os.IsExist(err) {
				return err
			}
			dirs = append(dirs, dirTime{target, hdr.ModTime})
		case tar.TypeReg:
			f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, target); err != nil {
				return err
			}
		case tar.TypeLink:
			src := filepath.Join(root, path.Clean("/"+hdr.Linkname))
			if err := checkParents(root, src); err != nil {
				return err
			}
			if err := os.Link(src, target); err != nil {
				return err
			}
			continue
		case tar.TypeFifo:
			if err := mkfifo(target); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: unsupported entry type %q", hdr.Name, hdr.Typeflag)
		}
		if err := os.Lchown(target, hdr.Uid, hdr.Gid); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeSymlink {
			// After chown, which clears set-id bits.
			perm := mode
			if hdr.Mode&0o4000 != 0 {
				perm |= os.ModeSetuid
			}
			if hdr.Mode&0o2000 != 0 {
				perm |= os.ModeSetgid
			}
			if hdr.Mode&0o1000 != 0 {
				perm |= os.ModeSticky
			}
			if err := os.Chmod(target, perm); err != nil {
				return err
			}
			if hdr.Typeflag != tar.TypeDir {
				if err := os.Chtimes(target, hdr.ModTime, hdr.ModTime); err != nil {
					return err
				}
			}
		}
	}
	// Directories' times last: their entries' creation changed them.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chtimes(dirs[i].path, dirs[i].t, dirs[i].t); err != nil {
			return err
		}
	}
	return nil
}

func checkParents(root, target string) error {
	rel, err := filepath.Rel(root, filepath.Dir(target))
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("%s is outside %s", target, root)
	}
	p := root
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		if part == "." {
			continue
		}
		p = filepath.Join(p, part)
		st, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("%s: its directory %s: %w", target, p, err)
		}
		if st.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("%s: its directory %s is a symbolic link", target, p)
		}
	}
	return nil
}

func mkfifo(p string) error { return syscall.Mkfifo(p, 0o600) }

// Build runs hack/image.sh in the repository at repo (the root filesystem
// cached, the binary rebuilt) and returns the archive's path.
func Build(repo string) (string, error) {
	// A relative path is resolved in Dir, where the child starts: run
	// the script from there ("../.." from test/e2e is the repository).
	cmd := exec.Command("./hack/image.sh")
	cmd.Dir = repo
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("hack/image.sh: %w\n%s", err, out)
	}
	return filepath.Abs(filepath.Join(repo, "_output/kube-bpf-proxy-image.tar"))
}

// Unpacked checks the archive (Open) and unpacks it into dir, which must
// not exist yet; it returns the image's entrypoint.
func Unpacked(archive, dir string) (entrypoint []string, err error) {
	img, err := Open(archive)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", archive, err)
	}
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("%s exists already", dir)
	}
	if err := img.Unpack(dir); err != nil {
		return nil, err
	}
	return img.Config.Config.Entrypoint, nil
}
