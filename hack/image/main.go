// Command image writes the kube-bpf-proxy image archive from a root
// filesystem and the binary, without a registry or a container engine
// (hack/image.sh prepares both; docs/image.md says what the image holds).
//
// The archive is one tar holding both an OCI image layout (oci-layout,
// index.json, blobs/sha256/...) and a docker-archive manifest.json naming
// the same blobs, as BuildKit's docker exporter writes it: docker load and
// podman load read the manifest.json, ctr images import and kind load
// image-archive the OCI index.
//
// It is reproducible: entries sorted, every mtime at SOURCE_DATE_EPOCH (the
// commit's time), no access or change times, no user or group names, no
// extended attributes, the same gzip settings; so one root filesystem and
// one binary give one digest.
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	var o Options
	flag.StringVar(&o.Rootfs, "rootfs", "", "the root filesystem's directory (hack/image.sh builds it with debootstrap)")
	flag.StringVar(&o.Binary, "binary", "", "the static kube-bpf-proxy binary")
	flag.StringVar(&o.Name, "name", "kube-bpf-proxy:latest", "the image's name and tag")
	flag.StringVar(&o.Version, "version", "unknown", "the version label")
	flag.StringVar(&o.Revision, "revision", "unknown", "the commit label")
	out := flag.String("o", "_output/kube-bpf-proxy-image.tar", "the archive to write")
	flag.Parse()
	if o.Rootfs == "" || o.Binary == "" {
		fmt.Fprintln(os.Stderr, "image: -rootfs and -binary are required")
		os.Exit(2)
	}
	o.Created = time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "image: SOURCE_DATE_EPOCH=%q is not a number of seconds\n", s)
			os.Exit(2)
		}
		o.Created = time.Unix(n, 0).UTC()
	}
	res, err := Write(*out, o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "image: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s\n  name      %s\n  manifest  %s\n  config    %s (the image id docker shows)\n  layer     %s, %d bytes compressed, %d bytes unpacked\n",
		*out, res.Name, res.Manifest, res.Config, res.Layer, res.LayerSize, res.UnpackedSize)
}
