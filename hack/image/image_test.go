package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/ociimage"
)

const repoRoot = "../.."

var epoch = time.Unix(1764900000, 0).UTC()

// fakeRootfs is a small root filesystem with what the real one has that
// needs care: a hard link, a symbolic link, a setuid file, a group other
// than root, an empty directory.
func fakeRootfs(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"usr/bin", "usr/local/bin", "etc", "var/empty"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, data string, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(root, name), []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(root, name), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("usr/bin/perl", "#!perl", 0o755)
	write("usr/bin/su", "su", 0o755|os.ModeSetuid)
	write("etc/shadow", "root:*:", 0o640)
	if err := os.Link(filepath.Join(root, "usr/bin/perl"), filepath.Join(root, "usr/bin/perl5.36.0")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("perl", filepath.Join(root, "usr/bin/perl5")); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(filepath.Join(root, "etc/shadow"), 0, 42); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func fakeBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kube-bpf-proxy")
	if err := os.WriteFile(p, []byte("\x7fELF not really"), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWriteLayout writes an archive of a small root filesystem and checks
// it as a runtime would (ociimage.Open: index -> manifest -> config ->
// layer, every digest and size, diff_id, and manifest.json naming the same
// blobs), then what the layer holds.
func TestWriteLayout(t *testing.T) {
	out := filepath.Join(t.TempDir(), "image.tar")
	res, err := Write(out, Options{Rootfs: fakeRootfs(t), Binary: fakeBinary(t), Name: "kube-bpf-proxy:test",
		Version: "test", Revision: "abc", Created: epoch})
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Open(out)
	if err != nil {
		t.Fatalf("the archive is not a valid image: %v", err)
	}
	if img.ManifestDigest != res.Manifest {
		t.Errorf("index names %s, Write returned %s", img.ManifestDigest, res.Manifest)
	}
	if img.Name != "docker.io/library/kube-bpf-proxy:test" {
		t.Errorf("io.containerd.image.name = %q", img.Name)
	}
	if got := img.Docker.RepoTags; len(got) != 1 || got[0] != "kube-bpf-proxy:test" {
		t.Errorf("manifest.json RepoTags = %q", got)
	}
	if got := img.Config.Config.Entrypoint; len(got) != 1 || got[0] != "/usr/local/bin/kube-bpf-proxy" {
		t.Errorf("entrypoint = %q", got)
	}
	files, err := img.Files()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]ociimage.File{}
	var names []string
	for _, f := range files {
		byName[f.Name] = f
		names = append(names, f.Name)
		if !f.ModTime.Equal(epoch) {
			t.Errorf("%s: mtime %v, want SOURCE_DATE_EPOCH %v", f.Name, f.ModTime, epoch)
		}
	}
	if !sortedStrings(names) {
		t.Errorf("entries not sorted: %q", names)
	}
	for name, want := range map[string]ociimage.File{
		"usr/local/bin/kube-bpf-proxy": {Type: tar.TypeReg, Mode: 0o755},
		"usr/local/bin/kube-proxy":     {Type: tar.TypeSymlink, Linkname: "kube-bpf-proxy", Mode: 0o777},
		"usr/bin/perl":                 {Type: tar.TypeReg, Mode: 0o755},
		"usr/bin/perl5.36.0":           {Type: tar.TypeLink, Linkname: "usr/bin/perl", Mode: 0o755},
		"usr/bin/perl5":                {Type: tar.TypeSymlink, Linkname: "perl", Mode: 0o777},
		"usr/bin/su":                   {Type: tar.TypeReg, Mode: 0o4755},
		"var/empty":                    {Type: tar.TypeDir, Mode: 0o755},
	} {
		got, ok := byName[name]
		if !ok {
			t.Errorf("%s missing from the layer", name)
			continue
		}
		if got.Type != want.Type || got.Mode != want.Mode || got.Linkname != want.Linkname || got.Uid != 0 {
			t.Errorf("%s: type %q mode %o link %q uid %d, want type %q mode %o link %q uid 0",
				name, got.Type, got.Mode, got.Linkname, got.Uid, want.Type, want.Mode, want.Linkname)
		}
	}
	if os.Geteuid() == 0 && byName["etc/shadow"].Gid != 42 {
		t.Errorf("etc/shadow: gid %d, want the root filesystem's 42", byName["etc/shadow"].Gid)
	}
	skopeoCheck(t, out, "test")
}

// TestWriteReproducible writes the same inputs twice, with the files'
// own times changed in between: the archives are byte for byte the same.
func TestWriteReproducible(t *testing.T) {
	root, bin := fakeRootfs(t), fakeBinary(t)
	dir := t.TempDir()
	o := Options{Rootfs: root, Binary: bin, Name: "kube-bpf-proxy:test", Version: "test", Revision: "abc", Created: epoch}
	first, err := Write(filepath.Join(dir, "1.tar"), o)
	if err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	for _, p := range []string{filepath.Join(root, "usr/bin/perl"), filepath.Join(root, "etc"), bin} {
		if err := os.Chtimes(p, later, later); err != nil {
			t.Fatal(err)
		}
	}
	second, err := Write(filepath.Join(dir, "2.tar"), o)
	if err != nil {
		t.Fatal(err)
	}
	if first != second {
		t.Errorf("two builds differ:\n%+v\n%+v", first, second)
	}
	a, _ := os.ReadFile(filepath.Join(dir, "1.tar"))
	b, _ := os.ReadFile(filepath.Join(dir, "2.tar"))
	if !bytes.Equal(a, b) {
		t.Error("two builds' archives differ")
	}
}

func sortedStrings(s []string) bool {
	for i := 1; i < len(s); i++ {
		if s[i-1] >= s[i] {
			return false
		}
	}
	return true
}

// requireReal returns the cached Debian root filesystem (make image
// builds it once with debootstrap, minutes; the test skips without it) and
// a binary built as hack/build.sh builds it.
func requireReal(t *testing.T) (rootfs, binary string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the image's root filesystem is built with debootstrap, as root")
	}
	// Only the cached one: a debootstrap takes minutes, and make image
	// (which hack/test.sh runs first) is what builds it.
	cmd := exec.Command(filepath.Join(repoRoot, "hack/image.sh"))
	cmd.Env = append(os.Environ(), "KBP_IMAGE_ROOTFS=cached")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 3 {
		t.Skipf("the image's root filesystem is not built yet (make image builds it): %s", strings.TrimSpace(stderr.String()))
	}
	if err != nil {
		t.Fatalf("KBP_IMAGE_ROOTFS=cached hack/image.sh: %v\n%s", err, stderr.String())
	}
	rootfs = strings.TrimSpace(string(out))
	binary = filepath.Join(t.TempDir(), "kube-bpf-proxy")
	build := exec.Command("go", "build", "-trimpath", "-o", binary, "./cmd/kube-bpf-proxy")
	build.Dir = repoRoot
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building kube-bpf-proxy: %v\n%s", err, out)
	}
	return rootfs, binary
}

// TestImage builds the real image twice from the cached root filesystem
// and one binary: one digest; then checks the layout and that the layer
// holds the entrypoint, the kube-proxy link and every command the proxy
// runs; and, if skopeo is installed (hack/test.sh installs it), that
// skopeo reads it both as an OCI archive and as a docker archive and
// copies it, which checks every blob's digest again.
func TestImage(t *testing.T) {
	rootfs, binary := requireReal(t)
	dir := t.TempDir()
	o := Options{Rootfs: rootfs, Binary: binary, Name: "kube-bpf-proxy:test", Version: "test", Revision: "test", Created: epoch}
	first, err := Write(filepath.Join(dir, "1.tar"), o)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Write(filepath.Join(dir, "2.tar"), o)
	if err != nil {
		t.Fatal(err)
	}
	if first.Manifest != second.Manifest {
		t.Errorf("two builds of one commit give two digests: %s and %s", first.Manifest, second.Manifest)
	}
	t.Logf("image %s, layer %d bytes compressed, %d unpacked", first.Manifest, first.LayerSize, first.UnpackedSize)

	archive := filepath.Join(dir, "1.tar")
	img, err := ociimage.Open(archive)
	if err != nil {
		t.Fatalf("the archive is not a valid image: %v", err)
	}
	if got := img.Config.Config.Entrypoint; len(got) != 1 || got[0] != "/usr/local/bin/kube-bpf-proxy" {
		t.Errorf("entrypoint = %q", got)
	}
	files, err := img.Files()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]ociimage.File{}
	for _, f := range files {
		byName[f.Name] = f
	}
	for _, want := range []string{
		"usr/local/bin/kube-bpf-proxy", "usr/local/bin/kube-proxy",
		// iptables mode and the eBPF mode's packet layer, both backends
		"usr/sbin/iptables-nft-restore", "usr/sbin/iptables-nft-save",
		"usr/sbin/iptables-legacy-restore", "usr/sbin/iptables-legacy-save",
		"usr/sbin/conntrack", "usr/sbin/nft",
		// the iptables code runs them through nsenter (util-linux) in
		// another network namespace
		"usr/bin/nsenter",
	} {
		if _, ok := byName[want]; !ok {
			t.Errorf("/%s missing from the image", want)
		}
	}
	if l := byName["usr/local/bin/kube-proxy"]; l.Type != tar.TypeSymlink || l.Linkname != "kube-bpf-proxy" {
		t.Errorf("/usr/local/bin/kube-proxy: type %q -> %q, want a link to kube-bpf-proxy", l.Type, l.Linkname)
	}
	for _, gone := range []string{"var/cache/apt/pkgcache.bin", "var/log/dpkg.log", "etc/machine-id", "usr/share/man/man8"} {
		if _, ok := byName[gone]; ok {
			t.Errorf("/%s is in the image: it differs from one debootstrap to the next or is trimmed", gone)
		}
	}

	skopeoCheck(t, archive, "test")
	if dir := os.Getenv("KBP_CONTAINERD_DIR"); dir != "" {
		if out := containerdImport(t, dir, archive); !strings.Contains(out, "docker.io/library/kube-bpf-proxy:test") {
			t.Errorf("ctr images ls after the import:\n%s", out)
		}
	}
}

// skopeoCheck reads the archive with skopeo (the library podman load uses)
// as an OCI archive and as a docker archive, and copies it each way, which
// checks every blob's digest again.
func skopeoCheck(t *testing.T, archive, tag string) {
	t.Helper()
	skopeo, err := exec.LookPath("skopeo")
	if err != nil {
		t.Log("skopeo is not installed (apt-get install skopeo): not checked with it")
		return
	}
	for _, ref := range []string{"oci-archive:" + archive + ":" + tag, "docker-archive:" + archive} {
		out, err := exec.Command(skopeo, "inspect", "--raw", ref).CombinedOutput()
		if err != nil {
			t.Errorf("skopeo inspect %s: %v\n%s", ref, err, out)
			continue
		}
		out, err = exec.Command(skopeo, "inspect", "--config", ref).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "/usr/local/bin/kube-bpf-proxy") {
			t.Errorf("skopeo inspect --config %s: %v\n%s", ref, err, out)
		}
		dest := filepath.Join(t.TempDir(), "copy")
		if out, err := exec.Command(skopeo, "copy", "--quiet", ref, "dir:"+dest).CombinedOutput(); err != nil {
			t.Errorf("skopeo copy %s: %v\n%s", ref, err, out)
		}
	}
}

// containerdImport imports the archive with `ctr images import` into a
// containerd started for the test (its own root, state and socket under a
// temporary directory, no CRI plugin), as kind load image-archive and a
// node's operator do, unpacking it with the overlayfs snapshotter, and
// returns what `ctr images ls` lists. dir holds the containerd and ctr
// binaries (KBP_CONTAINERD_DIR; Debian's containerd package has them).
func containerdImport(t *testing.T, dir, archive string) string {
	t.Helper()
	tmp, err := os.MkdirTemp("", "kbp-containerd-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	sock := filepath.Join(tmp, "containerd.sock")
	config := `version = 2
root = "` + tmp + `/root"
state = "` + tmp + `/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "` + sock + `"
[ttrpc]
  address = "` + sock + `.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "` + tmp + `/opt"
`
	if err := os.WriteFile(filepath.Join(tmp, "config.toml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	daemon := exec.Command(filepath.Join(dir, "containerd"), "--config", filepath.Join(tmp, "config.toml"))
	daemon.Stdout, daemon.Stderr = &log, &log
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = daemon.Process.Kill()
		_ = daemon.Wait()
		// Snapshots are mounted only while in use; none is left.
	}()
	ctr := func(args ...string) (string, error) {
		out, err := exec.Command(filepath.Join(dir, "ctr"), append([]string{"--address", sock, "--namespace", "kbp-test"}, args...)...).CombinedOutput()
		return string(out), err
	}
	for i := 0; ; i++ {
		if _, err := ctr("version"); err == nil {
			break
		} else if i == 100 {
			t.Fatalf("containerd did not start: %v\n%s", err, log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := ctr("images", "import", archive); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	} else {
		t.Logf("ctr images import:\n%s", out)
	}
	out, err := ctr("images", "ls")
	if err != nil {
		t.Fatalf("ctr images ls: %v\n%s", err, out)
	}
	if check, err := ctr("images", "check"); err != nil || !strings.Contains(check, "complete") {
		t.Errorf("ctr images check: %v\n%s", err, check)
	}
	return out
}

// TestContainerdImport imports a small image with ctr (when
// KBP_CONTAINERD_DIR names containerd's binaries): containerd names it
// after the index's annotation.
func TestContainerdImport(t *testing.T) {
	dir := os.Getenv("KBP_CONTAINERD_DIR")
	if dir == "" || os.Geteuid() != 0 {
		t.Skip("KBP_CONTAINERD_DIR (containerd and ctr) not set, or not root")
	}
	archive := filepath.Join(t.TempDir(), "image.tar")
	if _, err := Write(archive, Options{Rootfs: fakeRootfs(t), Binary: fakeBinary(t), Name: "kube-bpf-proxy:test",
		Version: "test", Revision: "abc", Created: epoch}); err != nil {
		t.Fatal(err)
	}
	if out := containerdImport(t, dir, archive); !strings.Contains(out, "docker.io/library/kube-bpf-proxy:test") {
		t.Errorf("ctr images ls after the import:\n%s", out)
	}
}

// rewrite copies the archive with one entry changed by edit.
func rewrite(t *testing.T, src, dst string, edit func(name string, data []byte) []byte) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	tr, tw := tar.NewReader(in), tar.NewWriter(out)
	for {
		hdr, err := tr.Next()
		if err != nil {
			break
		}
		var buf bytes.Buffer
		if _, err := buf.ReadFrom(tr); err != nil {
			t.Fatal(err)
		}
		data := edit(hdr.Name, buf.Bytes())
		hdr.Size = int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// The check the tests rely on refuses an archive whose parts do not match.
func TestOpenRejects(t *testing.T) {
	good := filepath.Join(t.TempDir(), "image.tar")
	res, err := Write(good, Options{Rootfs: fakeRootfs(t), Binary: fakeBinary(t), Name: "kube-bpf-proxy:test", Created: epoch})
	if err != nil {
		t.Fatal(err)
	}
	layer := blobPath(res.Layer)
	for name, edit := range map[string]func(string, []byte) []byte{
		"a layer byte changed": func(n string, b []byte) []byte {
			if n == layer {
				b = append([]byte{}, b...)
				b[len(b)/2] ^= 0xff
			}
			return b
		},
		"the config changed": func(n string, b []byte) []byte {
			if n == blobPath(res.Config) {
				b = bytes.Replace(b, []byte(`"diff_ids":["sha256:`), []byte(`"diff_ids":["sha256:0`), 1)
			}
			return b
		},
		"manifest.json names another config": func(n string, b []byte) []byte {
			if n == "manifest.json" {
				b = bytes.Replace(b, []byte(strings.TrimPrefix(res.Config, "sha256:")), []byte(strings.TrimPrefix(res.Manifest, "sha256:")), 1)
			}
			return b
		},
		"the index names another blob": func(n string, b []byte) []byte {
			if n == "index.json" {
				b = bytes.Replace(b, []byte(strings.TrimPrefix(res.Manifest, "sha256:")), []byte(strings.TrimPrefix(res.Layer, "sha256:")), 1)
			}
			return b
		},
	} {
		t.Run(name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad.tar")
			rewrite(t, good, bad, edit)
			if _, err := ociimage.Open(bad); err == nil {
				t.Error("accepted")
			} else {
				t.Log(err)
			}
		})
	}
}
