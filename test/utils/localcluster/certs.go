package localcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// credentials are generated for each cluster: nothing is shared between
// runs or with anything on the machine.
type credentials struct {
	CACert     string // PEM
	AdminToken string
	KCMToken   string
}

// writeCredentials creates, in dir, a CA, the API server's serving
// certificate (signed by the CA, for every name clients use), the
// service-account signing key pair and the static token file for the admin
// and the controller manager.
func writeCredentials(dir string, apiIPs []string) (*credentials, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kube-bpf-proxy local cluster CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
	}
	for _, ip := range append([]string{"127.0.0.1", "10.96.0.1"}, apiIPs...) {
		srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, net.ParseIP(ip))
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}

	// Service-account tokens are signed with RSA, which every consumer of
	// the issuer's keys accepts.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	srvKeyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		return nil, err
	}

	creds := &credentials{
		CACert:     string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		AdminToken: randomToken(),
		KCMToken:   randomToken(),
	}
	files := map[string]string{
		"ca.crt":        creds.CACert,
		"apiserver.crt": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER})),
		"apiserver.key": string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: srvKeyDER})),
		"sa.key":        string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)})),
		"sa.pub":        string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub})),
		// token,user,uid,"group1,group2". The controller manager runs every
		// controller under its own name, with cluster-admin's groups: a
		// local test cluster has no need for per-controller identities.
		"tokens.csv": strings.Join([]string{
			fmt.Sprintf(`%s,admin,admin,"system:masters"`, creds.AdminToken),
			fmt.Sprintf(`%s,system:kube-controller-manager,kcm,"system:masters"`, creds.KCMToken),
		}, "\n") + "\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			return nil, err
		}
	}
	return creds, nil
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// kubeconfig renders a kubeconfig for one user authenticated by token.
func kubeconfig(server, caPEM, user, token string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: %s\n", server)
	fmt.Fprintf(&b, "    certificate-authority-data: %s\n", b64(caPEM))
	fmt.Fprintf(&b, "users:\n- name: %s\n  user:\n    token: %s\n", user, token)
	fmt.Fprintf(&b, "contexts:\n- name: local\n  context:\n    cluster: local\n    user: %s\ncurrent-context: local\n", user)
	return b.String()
}
