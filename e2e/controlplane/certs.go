package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// certValidity is long enough for any test run and short enough that a
// leaked throw-away CA is not useful for long.
const certValidity = 365 * 24 * time.Hour

// clientIdentity is one client certificate (and kubeconfig) to issue. The
// API server's x509 authenticator maps CN to the user and O to groups.
type clientIdentity struct {
	// file is the base name of the .crt/.key pair and, when kubeconfig is
	// set, of "<file>.kubeconfig" in the run directory.
	file       string
	cn         string
	orgs       []string
	kubeconfig bool
}

// stringList collects a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// runCerts writes a fresh PKI for one throw-away cluster:
//
//	DIR/pki/ca.{crt,key}               cluster CA (client CA, CSR signer, SA root CA)
//	DIR/pki/apiserver.{crt,key}        serving cert for 127.0.0.1, ::1, localhost and the kubernetes Service
//	DIR/pki/sa.{key,pub}               service-account token signing key pair
//	DIR/pki/<client>.{crt,key}         admin, kube-scheduler, kube-controller-manager,
//	                                   apiserver-kubelet-client, node-<name>
//	DIR/{admin,scheduler,controller-manager,node-<name>}.kubeconfig
//
// Kubeconfigs embed their certificates so they stay valid when copied. It
// refuses to overwrite an existing CA: a second run against the same etcd
// data would silently invalidate every issued token and certificate.
func runCerts(args []string) int {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	dir := fs.String("dir", "", "run directory to write pki/ and kubeconfigs into (required)")
	server := fs.String("server", "", "API server URL written into kubeconfigs, e.g. https://127.0.0.1:6443 (required)")
	serviceIP := fs.String("service-ip", "10.0.0.1", "cluster IP of the kubernetes Service (first IP of --service-cluster-ip-range)")
	var nodes stringList
	fs.Var(&nodes, "node", "also issue a kubelet client identity system:node:NAME and node-NAME.kubeconfig (repeatable)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" || *server == "" || fs.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "certs: --dir and --server are required and no positional arguments are accepted")
		return 2
	}
	svcIP := net.ParseIP(*serviceIP)
	if svcIP == nil {
		fmt.Fprintf(os.Stderr, "certs: --service-ip %q is not an IP address\n", *serviceIP)
		return 2
	}
	if err := writePKI(*dir, *server, svcIP, nodes); err != nil {
		fmt.Fprintf(os.Stderr, "certs: %v\n", err)
		return 1
	}
	return 0
}

// writePKI does the work of runCerts; see there for the layout.
func writePKI(dir, server string, serviceIP net.IP, nodes []string) error {
	pki := filepath.Join(dir, "pki")
	if _, err := os.Stat(filepath.Join(pki, "ca.crt")); err == nil {
		return fmt.Errorf("%s already exists; use a fresh run directory", filepath.Join(pki, "ca.crt"))
	}
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", pki, err)
	}

	caKey, err := newKey()
	if err != nil {
		return err
	}
	caTmpl, err := template(pkix.Name{CommonName: "nvdra-e2e-ca"})
	if err != nil {
		return err
	}
	caTmpl.IsCA = true
	caTmpl.BasicConstraintsValid = true
	caTmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return fmt.Errorf("self-sign CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("parse CA: %w", err)
	}
	caPEM, err := writePair(pki, "ca", caDER, caKey)
	if err != nil {
		return err
	}

	serving, err := template(pkix.Name{CommonName: "kube-apiserver"})
	if err != nil {
		return err
	}
	serving.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	serving.DNSNames = []string{
		"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local",
	}
	serving.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, serviceIP}
	if _, _, err := issue(pki, "apiserver", serving, caCert, caKey); err != nil {
		return err
	}

	saKey, err := newKey()
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(pki, "sa.key"), saKey); err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return fmt.Errorf("encode service-account public key: %w", err)
	}
	if err := writePEM(filepath.Join(pki, "sa.pub"), "PUBLIC KEY", saPub, 0o644); err != nil {
		return err
	}

	clients := []clientIdentity{
		{file: "admin", cn: "nvdra-e2e-admin", orgs: []string{"system:masters"}, kubeconfig: true},
		{file: "scheduler", cn: "system:kube-scheduler", kubeconfig: true},
		{file: "controller-manager", cn: "system:kube-controller-manager", kubeconfig: true},
		// For --kubelet-client-certificate: lets the API server reach a
		// (simulated) kubelet's logs/exec endpoints as a privileged user.
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}},
	}
	for _, n := range nodes {
		clients = append(clients, clientIdentity{
			file: "node-" + n, cn: "system:node:" + n, orgs: []string{"system:nodes"}, kubeconfig: true,
		})
	}
	for _, c := range clients {
		tmpl, err := template(pkix.Name{CommonName: c.cn, Organization: c.orgs})
		if err != nil {
			return err
		}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		certPEM, keyPEM, err := issue(pki, c.file, tmpl, caCert, caKey)
		if err != nil {
			return err
		}
		if c.kubeconfig {
			path := filepath.Join(dir, c.file+".kubeconfig")
			if err := writeKubeconfig(path, server, c.cn, caPEM, certPEM, keyPEM); err != nil {
				return err
			}
		}
	}
	return nil
}

// newKey makes an ECDSA P-256 key: fast to generate and accepted by every
// component (TLS, client certs, ES256 service-account tokens).
func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return k, nil
}

// template returns a certificate template with a random serial number and
// the common validity window; NotBefore is backdated to tolerate clock skew.
func template(subject pkix.Name) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("draw serial number: %w", err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      subject,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}, nil
}

// issue signs tmpl with the CA under a fresh key and writes NAME.crt/NAME.key.
func issue(pki, name string, tmpl, ca *x509.Certificate, caKey crypto.Signer) (certPEM, keyPEM []byte, err error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign %s certificate: %w", name, err)
	}
	certPEM, err = writePair(pki, name, der, key)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = os.ReadFile(filepath.Join(pki, name+".key"))
	if err != nil {
		return nil, nil, fmt.Errorf("read back %s key: %w", name, err)
	}
	return certPEM, keyPEM, nil
}

// writePair writes NAME.crt (0644) and NAME.key (0600) and returns the
// certificate PEM.
func writePair(pki, name string, der []byte, key *ecdsa.PrivateKey) ([]byte, error) {
	if err := writeKey(filepath.Join(pki, name+".key"), key); err != nil {
		return nil, err
	}
	path := filepath.Join(pki, name+".crt")
	if err := writePEM(path, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// writeKey writes a PKCS#8 private key, which every component can parse.
func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// writeKubeconfig writes a single-context kubeconfig with embedded data.
func writeKubeconfig(path, server, user string, caPEM, certPEM, keyPEM []byte) error {
	if len(caPEM) == 0 || len(certPEM) == 0 || len(keyPEM) == 0 {
		return errors.New("writeKubeconfig: empty certificate data")
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["nvdra-e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts["nvdra-e2e"] = &clientcmdapi.Context{Cluster: "nvdra-e2e", AuthInfo: user}
	cfg.CurrentContext = "nvdra-e2e"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
