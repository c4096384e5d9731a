package main

import (
	"os"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // auth plugins, as in upstream kubectl
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
)

// runKubectl runs kubectl at exactly the control plane's version.
//
// The host's kubectl is often several minor versions older than the API
// server, outside the supported ±1 skew; a matching kubectl in the same
// binary costs little extra build time because it shares most packages with
// the components. It reads os.Args, which main has already rewritten.
func runKubectl() int {
	// Upstream kubectl sets the verbosity before building the command so
	// that plugin and kuberc handling can log; do the same.
	_, _ = logs.GlogSetter(kubectl.GetLogVerbosity(os.Args))
	if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
		// CheckErr prints the error the way kubectl users expect and exits
		// with kubectl's own exit codes.
		kubectlutil.CheckErr(err)
	}
	return 0
}
