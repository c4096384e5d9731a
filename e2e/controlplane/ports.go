package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
)

// Ports are drawn from below Linux's default ephemeral range (32768-60999):
// a port the kernel may hand out as the source port of an outgoing
// connection (say, the API server's own connection to etcd) could be taken
// between choosing it here and the component binding it.
const (
	portLow    = 20000
	portHigh   = 32768
	portTries  = 500
	maxPortsIn = 64
)

// runFreePorts prints N distinct TCP ports on 127.0.0.1 that were free a
// moment ago, one per line.
//
// All N listeners are held open together so no port is printed twice.
// Another process may still bind one before the caller does; up.sh then
// fails loudly and can be rerun. Random ports, rather than the components'
// fixed defaults (6443, 2379, 10257, 10259), let several clusters and other
// software on the machine coexist.
func runFreePorts(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "free-ports: expected exactly one argument N")
		return 2
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 || n > maxPortsIn {
		fmt.Fprintf(os.Stderr, "free-ports: N must be an integer in 1..%d, got %q\n", maxPortsIn, args[0])
		return 2
	}
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for tries := 0; len(listeners) < n; tries++ {
		if tries == portTries {
			fmt.Fprintf(os.Stderr, "free-ports: found only %d free ports in %d tries\n", len(listeners), portTries)
			return 1
		}
		port := portLow + rand.IntN(portHigh-portLow)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		listeners = append(listeners, l)
	}
	for _, l := range listeners {
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
	}
	return 0
}
