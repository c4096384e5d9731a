// Command nvdra-controlplane runs a real upstream Kubernetes control plane
// (etcd, kube-apiserver, kube-scheduler, kube-controller-manager) for nvdra's
// end-to-end tests, without containers or downloaded release binaries.
//
// One binary holds every component so that a single `go build` produces the
// whole control plane. The first argument picks the component; everything
// after it is passed unchanged to that component's own command line, so the
// upstream flags and their documentation apply as-is:
//
//	nvdra-controlplane etcd --data-dir DIR --listen-client-url URL ...
//	nvdra-controlplane apiserver <kube-apiserver flags>
//	nvdra-controlplane scheduler <kube-scheduler flags>
//	nvdra-controlplane controller-manager <kube-controller-manager flags>
//	nvdra-controlplane kubectl <kubectl arguments>
//	nvdra-controlplane certs --dir DIR --server URL [--node NAME]...
//	nvdra-controlplane free-ports N
//	nvdra-controlplane all --log-dir DIR --pid-dir DIR -- etcd ... -- apiserver ...
//
// Only the chosen component's command is constructed, so the components'
// process-global state (feature gates, metrics registries, klog) never mixes
// within one process; `all` starts each component as a child process of this
// same binary for the same reason. Linux only: `all` ties its children's
// lives to its own with Pdeathsig.
//
// build.sh builds it, up.sh/down.sh start and stop a cluster in a run
// directory, smoke.sh checks that DRA scheduling works end to end.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json, as in the upstream mains
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as in the upstream mains
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as in the upstream mains
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "time/tzdata" // CronJob time zones, as in the upstream mains
)

const usage = `usage: nvdra-controlplane COMMAND [ARGS...]

commands:
  etcd                 embedded etcd server (see 'etcd -h')
  apiserver            kube-apiserver (upstream flags)
  scheduler            kube-scheduler (upstream flags)
  controller-manager   kube-controller-manager (upstream flags)
  kubectl              kubectl matching the control plane's version
  certs                write a CA, serving/client certificates, a service-account key and kubeconfigs
  free-ports N         print N currently free TCP ports on 127.0.0.1
  all                  supervise several of the above as child processes (see 'all -h')
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	sub, args := os.Args[1], os.Args[2:]
	// The upstream commands read os.Args themselves (cobra's default
	// arguments, kubectl's plugin lookup and verbosity pre-parse), so they
	// must see their arguments as if they were their own binary.
	os.Args = append([]string{filepath.Base(os.Args[0]) + " " + sub}, args...)
	os.Exit(run(sub, args))
}

// run dispatches to one subcommand and returns the process exit code.
func run(sub string, args []string) int {
	switch sub {
	case "etcd":
		return runEtcd(args)
	case "apiserver":
		return runCobra(apiserver.NewAPIServerCommand(), args)
	case "scheduler":
		return runCobra(scheduler.NewSchedulerCommand(), args)
	case "controller-manager":
		return runCobra(controllermanager.NewControllerManagerCommand(), args)
	case "kubectl":
		return runKubectl()
	case "certs":
		return runCerts(args)
	case "free-ports":
		return runFreePorts(args)
	case "all":
		return runAll(args)
	case "-h", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return 0
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", sub, usage)
		return 2
	}
}

// runCobra runs an upstream component command the way its own main does.
func runCobra(cmd *cobra.Command, args []string) int {
	cmd.SetArgs(args)
	return cli.Run(cmd)
}
