package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// etcdReadyTimeout bounds how long a single-member etcd may take to elect
// itself leader; on an idle machine this is well under a second, so hitting
// it means the data dir or ports are unusable.
const etcdReadyTimeout = 60 * time.Second

// runEtcd runs a single-member etcd cluster in this process until SIGTERM or
// SIGINT, using the etcd server library at the version Kubernetes pins.
//
// Only the handful of settings a throw-away test cluster needs are exposed;
// peer traffic still needs a port because etcd always serves its peer API,
// so the peer URL is a flag too (the default 2380 would collide between
// concurrent clusters).
func runEtcd(args []string) int {
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "directory for etcd's data (required)")
	clientURL := fs.String("listen-client-url", "http://127.0.0.1:2379", "URL to serve clients on; also advertised")
	peerURL := fs.String("listen-peer-url", "http://127.0.0.1:2380", "URL to serve the (unused) peer API on; also advertised")
	noFsync := fs.Bool("unsafe-no-fsync", false, "skip fsync: much faster on shared disks, loses data on a machine crash (fine for tests)")
	quota := fs.Int64("quota-backend-bytes", 0, "backend size limit in bytes (0: etcd's default)")
	logLevel := fs.String("log-level", "warn", "etcd log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dataDir == "" || fs.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "etcd: --data-dir is required and no positional arguments are accepted")
		return 2
	}
	client, err := url.Parse(*clientURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: parse --listen-client-url: %v\n", err)
		return 2
	}
	peer, err := url.Parse(*peerURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: parse --listen-peer-url: %v\n", err)
		return 2
	}

	cfg := embed.NewConfig()
	cfg.Name = "nvdra"
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = *noFsync
	cfg.QuotaBackendBytes = *quota
	cfg.LogLevel = *logLevel
	cfg.LogOutputs = []string{"stderr"}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		return 1
	}
	defer e.Close()

	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready, serving clients on %s\n", client)
	case <-time.After(etcdReadyTimeout):
		fmt.Fprintf(os.Stderr, "etcd: not ready after %s\n", etcdReadyTimeout)
		return 1
	case <-ctx.Done():
		return 0
	}

	select {
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "etcd: signal received, shutting down")
		return 0
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: serve: %v\n", err)
		return 1
	}
}
