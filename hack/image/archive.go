package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Where the image puts the binary, and the name kubeadm's kube-proxy
// DaemonSet runs (command: /usr/local/bin/kube-proxy), linked to it so
// that DaemonSet needs only its image changed.
const (
	Entrypoint    = "/usr/local/bin/kube-bpf-proxy"
	KubeProxyLink = "/usr/local/bin/kube-proxy"
)

// Media types of the OCI image spec v1.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// Options is what the image is made of.
type Options struct {
	Rootfs, Binary string
	// Name is the image's reference, "kube-bpf-proxy:v1.2.3".
	Name              string
	Version, Revision string
	// Created is every file's mtime and the config's creation time.
	Created time.Time
}

// Result names what was written.
type Result struct {
	// Name is the fully qualified reference the index annotates.
	Name string
	// Manifest is the image's digest (what a registry would show);
	// Config is docker's image id.
	Manifest, Config, Layer string
	LayerSize, UnpackedSize int64
}

// Descriptor, Manifest, Index and Config are the parts of the OCI image
// spec the archive holds; the tests decode them too.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *Platform         `json:"platform,omitempty"`
}

type Platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

type Index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []Descriptor `json:"manifests"`
}

type Config struct {
	Created      string          `json:"created"`
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Config       ContainerConfig `json:"config"`
	RootFS       struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
	History []History `json:"history"`
}

type ContainerConfig struct {
	Entrypoint []string          `json:"Entrypoint"`
	Env        []string          `json:"Env"`
	WorkingDir string            `json:"WorkingDir,omitempty"`
	Labels     map[string]string `json:"Labels,omitempty"`
}

type History struct {
	Created   string `json:"created"`
	CreatedBy string `json:"created_by"`
	Comment   string `json:"comment,omitempty"`
}

// DockerManifest is one entry of a docker-archive's manifest.json.
type DockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// Write writes the archive to out (through a temporary file, renamed once
// complete).
func Write(out string, o Options) (Result, error) {
	var res Result
	ref, tag, err := normalize(o.Name)
	if err != nil {
		return res, err
	}
	res.Name = ref
	dir := filepath.Dir(out)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return res, err
	}
	layer, err := os.CreateTemp(dir, ".layer-*")
	if err != nil {
		return res, err
	}
	defer os.Remove(layer.Name())
	defer layer.Close()
	diffID, blobDigest, blobSize, unpacked, err := writeLayer(layer, o)
	if err != nil {
		return res, fmt.Errorf("writing the layer from %s: %w", o.Rootfs, err)
	}
	res.Layer, res.LayerSize, res.UnpackedSize = blobDigest, blobSize, unpacked

	created := o.Created.UTC().Format(time.RFC3339)
	var cfg Config
	cfg.Created = created
	cfg.Architecture, cfg.OS = "amd64", "linux"
	cfg.Config = ContainerConfig{
		Entrypoint: []string{Entrypoint},
		Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":    "kube-bpf-proxy",
			"org.opencontainers.image.version":  o.Version,
			"org.opencontainers.image.revision": o.Revision,
			"org.opencontainers.image.source":   "https://github.com/kube-bpf-proxy/kube-bpf-proxy",
			"org.opencontainers.image.licenses": "Apache-2.0",
		},
	}
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = []string{diffID}
	cfg.History = []History{{Created: created, CreatedBy: "hack/image.sh",
		Comment: "debootstrap --variant=minbase bookworm + hack/image/packages, and kube-bpf-proxy"}}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return res, err
	}
	cfgDesc := describe(mediaConfig, cfgJSON)
	res.Config = cfgDesc.Digest
	man := Manifest{SchemaVersion: 2, MediaType: mediaManifest, Config: cfgDesc,
		Layers: []Descriptor{{MediaType: mediaLayer, Digest: blobDigest, Size: blobSize}}}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return res, err
	}
	manDesc := describe(mediaManifest, manJSON)
	res.Manifest = manDesc.Digest
	manDesc.Platform = &Platform{Architecture: "amd64", OS: "linux"}
	// containerd (ctr images import, kind load, docker with the containerd
	// store) names the image after io.containerd.image.name; the OCI
	// layout's own ref.name is the tag.
	manDesc.Annotations = map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": tag,
	}
	indexJSON, err := json.Marshal(Index{SchemaVersion: 2, MediaType: mediaIndex, Manifests: []Descriptor{manDesc}})
	if err != nil {
		return res, err
	}
	dockerJSON, err := json.Marshal([]DockerManifest{{
		Config:   blobPath(cfgDesc.Digest),
		RepoTags: []string{o.Name},
		Layers:   []string{blobPath(blobDigest)},
	}})
	if err != nil {
		return res, err
	}

	f, err := os.CreateTemp(dir, ".image-*")
	if err != nil {
		return res, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(fileHeader(name, int64(len(data)), o.Created)); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	// Sorted by name, as every tar this command writes.
	type blob struct {
		digest string
		data   []byte
	}
	blobs := []blob{{cfgDesc.Digest, cfgJSON}, {manDesc.Digest, manJSON}, {blobDigest, nil}}
	sort.Slice(blobs, func(i, j int) bool { return blobs[i].digest < blobs[j].digest })
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(dirHeader(d, o.Created)); err != nil {
			return res, err
		}
	}
	for _, b := range blobs {
		if b.data != nil {
			if err := add(blobPath(b.digest), b.data); err != nil {
				return res, err
			}
			continue
		}
		if _, err := layer.Seek(0, io.SeekStart); err != nil {
			return res, err
		}
		if err := tw.WriteHeader(fileHeader(blobPath(b.digest), blobSize, o.Created)); err != nil {
			return res, err
		}
		if _, err := io.Copy(tw, layer); err != nil {
			return res, err
		}
	}
	for _, e := range []struct {
		name string
		data []byte
	}{
		{"index.json", indexJSON},
		{"manifest.json", dockerJSON},
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
	} {
		if err := add(e.name, e.data); err != nil {
			return res, err
		}
	}
	if err := tw.Close(); err != nil {
		return res, err
	}
	if err := f.Close(); err != nil {
		return res, err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return res, err
	}
	return res, os.Rename(f.Name(), out)
}

func describe(mediaType string, data []byte) Descriptor {
	sum := sha256.Sum256(data)
	return Descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(data))}
}

func blobPath(digest string) string {
	return "blobs/sha256/" + strings.TrimPrefix(digest, "sha256:")
}

func fileHeader(name string, size int64, mtime time.Time) *tar.Header {
	return &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o644, ModTime: mtime, Format: tar.FormatPAX}
}

func dirHeader(name string, mtime time.Time) *tar.Header {
	return &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}
}

// normalize returns the reference containerd would store name under
// (docker.io/library/kube-bpf-proxy:latest for kube-bpf-proxy) and its tag.
func normalize(name string) (ref, tag string, err error) {
	if name == "" || strings.ContainsAny(name, " \t\n@") {
		return "", "", fmt.Errorf("image name %q: want name[:tag], without a digest", name)
	}
	repo := name
	tag = "latest"
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		repo, tag = name[:i], name[i+1:]
	}
	first, _, found := strings.Cut(repo, "/")
	if !found || (!strings.ContainsAny(first, ".:") && first != "localhost") {
		if !found {
			repo = "library/" + repo
		}
		repo = "docker.io/" + repo
	}
	return repo + ":" + tag, tag, nil
}

// entry is one file of the layer: from the root filesystem (src), or added
// (the binary, the link).
type entry struct {
	name string // relative, no leading "/"; directories without a trailing one
	src  string // the file to read; "" for a link or a directory made here
	hdr  *tar.Header
}

// writeLayer writes the gzip-compressed layer to w; it returns the
// uncompressed tar's digest (the config's diff_id), the blob's digest and
// size, and the files' total size.
func writeLayer(w io.Writer, o Options) (diffID, digest string, size, unpacked int64, err error) {
	entries, err := collect(o)
	if err != nil {
		return "", "", 0, 0, err
	}
	blobHash := sha256.New()
	counter := &countingWriter{w: io.MultiWriter(w, blobHash)}
	// Compression level and the writer's header (no name, no mtime, OS
	// 255 "unknown") are fixed, so the same tar gives the same gzip with
	// one Go version.
	gz, err := gzip.NewWriterLevel(counter, gzip.DefaultCompression)
	if err != nil {
		return "", "", 0, 0, err
	}
	diffHash := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(gz, diffHash))
	// Hard links within the root filesystem (perl, for one) stay links.
	type inode struct{ dev, ino uint64 }
	seen := map[inode]string{}
	for _, e := range entries {
		hdr := e.hdr
		var st *syscall.Stat_t
		if e.src != "" && hdr.Typeflag == tar.TypeReg {
			info, err := os.Lstat(e.src)
			if err != nil {
				return "", "", 0, 0, err
			}
			st, _ = info.Sys().(*syscall.Stat_t)
			if st != nil && st.Nlink > 1 {
				k := inode{uint64(st.Dev), st.Ino}
				if first, ok := seen[k]; ok {
					hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				} else {
					seen[k] = hdr.Name
				}
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return "", "", 0, 0, fmt.Errorf("%s: %w", e.name, err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		unpacked += hdr.Size
		f, err := os.Open(e.src)
		if err != nil {
			return "", "", 0, 0, err
		}
		n, err := io.Copy(tw, f)
		f.Close()
		if err != nil {
			return "", "", 0, 0, fmt.Errorf("%s: %w", e.name, err)
		}
		if n != hdr.Size {
			return "", "", 0, 0, fmt.Errorf("%s changed while it was read", e.src)
		}
	}
	if err := tw.Close(); err != nil {
		return "", "", 0, 0, err
	}
	if err := gz.Close(); err != nil {
		return "", "", 0, 0, err
	}
	return sum(diffHash), sum(blobHash), counter.n, unpacked, nil
}

func sum(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// collect lists the layer's entries, sorted by name (a directory always
// before what it holds, as its name is a prefix of theirs).
func collect(o Options) ([]entry, error) {
	root, err := filepath.Abs(o.Rootfs)
	if err != nil {
		return nil, err
	}
	added := map[string]bool{
		strings.TrimPrefix(Entrypoint, "/"):    true,
		strings.TrimPrefix(KubeProxyLink, "/"): true,
	}
	var entries []entry
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == root {
			return nil
		}
		name, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		if added[name] {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := header(name, info, path, o.Created)
		if err != nil {
			return err
		}
		if hdr == nil {
			return nil
		}
		entries = append(entries, entry{name: name, src: path, hdr: hdr})
		return nil
	})
	if err != nil {
		return nil, err
	}
	bin, err := os.Stat(o.Binary)
	if err != nil {
		return nil, err
	}
	if !bin.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a file", o.Binary)
	}
	entries = append(entries,
		entry{name: strings.TrimPrefix(Entrypoint, "/"), src: o.Binary, hdr: &tar.Header{
			Typeflag: tar.TypeReg, Name: strings.TrimPrefix(Entrypoint, "/"), Size: bin.Size(),
			Mode: 0o755, ModTime: o.Created, Format: tar.FormatPAX}},
		entry{name: strings.TrimPrefix(KubeProxyLink, "/"), hdr: &tar.Header{
			Typeflag: tar.TypeSymlink, Name: strings.TrimPrefix(KubeProxyLink, "/"),
			Linkname: filepath.Base(Entrypoint), Mode: 0o777, ModTime: o.Created, Format: tar.FormatPAX}},
	)
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	for i := 1; i < len(entries); i++ {
		if entries[i].name == entries[i-1].name {
			return nil, fmt.Errorf("%s twice in the layer", entries[i].name)
		}
	}
	if len(entries) == 2 {
		return nil, errors.New("the root filesystem is empty")
	}
	return entries, nil
}

// header is the tar header of one file of the root filesystem, or nil for
// what an image does not hold (sockets, device nodes: the runtime makes
// /dev).
func header(name string, info fs.FileInfo, path string, mtime time.Time) (*tar.Header, error) {
	hdr := &tar.Header{Name: name, ModTime: mtime, Format: tar.FormatPAX}
	mode := info.Mode()
	hdr.Mode = int64(mode.Perm())
	if mode&fs.ModeSetuid != 0 {
		hdr.Mode |= 0o4000
	}
	if mode&fs.ModeSetgid != 0 {
		hdr.Mode |= 0o2000
	}
	if mode&fs.ModeSticky != 0 {
		hdr.Mode |= 0o1000
	}
	// The owners dpkg gave (root, but for the shadow files' group and a
	// few more), by number only: names would be this machine's.
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
	}
	switch {
	case mode.IsRegular():
		hdr.Typeflag, hdr.Size = tar.TypeReg, info.Size()
	case mode.IsDir():
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case mode&fs.ModeSymlink != 0:
		target, err := os.Readlink(path)
		if err != nil {
			return nil, err
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	case mode&fs.ModeNamedPipe != 0:
		hdr.Typeflag = tar.TypeFifo
	default:
		return nil, nil
	}
	return hdr, nil
}
