package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// restartDelay keeps a child that fails at once from spinning.
const restartDelay = time.Second

// child is one supervised component process.
type child struct {
	name string
	args []string
	cmd  *exec.Cmd
	// done is closed once cmd.Wait has returned; err is its result.
	done chan struct{}
	err  error
	// pidFile is removed when the child has exited, so a leftover file
	// always names a process that may still be running.
	pidFile string
}

// runAll starts several subcommands of this binary as child processes and
// keeps them running as one unit:
//
//	all [--log-dir DIR] [--pid-dir DIR] [--stop-timeout D] -- etcd ARGS -- apiserver ARGS ...
//
// A group "exec:NAME PROGRAM ARGS..." runs another program under NAME (its
// log and PID file names): the simulated nodes' kubelet emulator and agent
// get the same supervision as the control plane.
//
// Children start in the order given and stop in reverse order (so etcd
// outlives the API server that writes to it). A child that exits is
// restarted after restartDelay, like a static pod: the controller-manager,
// for one, gives up when the API server is not ready soon enough, and all
// components start together. After --restarts restarts of one child the
// others are stopped and all exits 1; on SIGTERM or SIGINT all children are
// stopped and it exits 0. Each child gets SIGTERM if this process dies, even by
// SIGKILL, so no component outlives its supervisor.
//
// Separate processes, rather than goroutines, keep the components' global
// state (feature gates, metric registries, klog flags) apart exactly as in a
// real cluster.
func runAll(args []string) int {
	fs := flag.NewFlagSet("all", flag.ContinueOnError)
	logDir := fs.String("log-dir", "", "write each child's output to DIR/<command>.log (default: this process's stderr)")
	pidDir := fs.String("pid-dir", "", "write this process's PID to DIR/all.pid and each child's to DIR/<command>.pid while they run")
	stopTimeout := fs.Duration("stop-timeout", 20*time.Second, "how long each child may take to exit after SIGTERM before it is killed")
	restarts := fs.Int("restarts", 5, "how often one child may be restarted after exiting before everything is stopped")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	groups := splitGroups(fs.Args())
	if len(groups) == 0 {
		fmt.Fprintln(os.Stderr, "all: expected '-- COMMAND ARGS...' groups after the flags")
		return 2
	}
	seen := map[string]bool{}
	for _, g := range groups {
		if g[0] == "all" || seen[g[0]] {
			fmt.Fprintf(os.Stderr, "all: command %q may appear once and cannot be 'all'\n", g[0])
			return 2
		}
		seen[g[0]] = true
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "all: locate own binary: %v\n", err)
		return 1
	}

	// Pdeathsig fires when the *thread* that started the child exits, not
	// the process; pinning this goroutine to its thread for the rest of the
	// process's life keeps the signal tied to the supervisor's death.
	runtime.LockOSThread()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if *pidDir != "" {
		// Written by the supervisor itself, so it is right even when a
		// wrapper such as setsid(1) forked before exec.
		own := filepath.Join(*pidDir, "all.pid")
		if err := os.WriteFile(own, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "all: write %s: %v\n", own, err)
			return 1
		}
		defer os.Remove(own)
	}

	// Every incarnation of every child reports here exactly once.
	exited := make(chan *child, len(groups)*(*restarts+1))
	children := make([]*child, 0, len(groups))
	for _, g := range groups {
		c, err := startChild(self, g, *logDir, *pidDir, exited)
		if err != nil {
			fmt.Fprintf(os.Stderr, "all: start %s: %v\n", g[0], err)
			stopChildren(children, *stopTimeout)
			return 1
		}
		fmt.Fprintf(os.Stderr, "all: started %s (pid %d)\n", c.name, c.cmd.Process.Pid)
		children = append(children, c)
	}

	restarted := map[string]int{}
	for {
		select {
		case <-ctx.Done():
			fmt.Fprintln(os.Stderr, "all: signal received, stopping children")
			stopChildren(children, *stopTimeout)
			return 0
		case c := <-exited:
			if restarted[c.name] >= *restarts {
				fmt.Fprintf(os.Stderr, "all: %s exited: %v; restarted %d times already, stopping the others\n",
					c.name, exitText(c.err), restarted[c.name])
				stopChildren(children, *stopTimeout)
				return 1
			}
			restarted[c.name]++
			fmt.Fprintf(os.Stderr, "all: %s exited: %v; restart %d of %d in %s\n",
				c.name, exitText(c.err), restarted[c.name], *restarts, restartDelay)
			select {
			case <-ctx.Done():
				// Handled by the outer loop with the remaining children.
				continue
			case <-time.After(restartDelay):
			}
			i := slices.Index(children, c)
			n, err := startChild(self, c.args, *logDir, *pidDir, exited)
			if err != nil {
				fmt.Fprintf(os.Stderr, "all: restart %s: %v\n", c.name, err)
				stopChildren(children, *stopTimeout)
				return 1
			}
			fmt.Fprintf(os.Stderr, "all: started %s (pid %d)\n", n.name, n.cmd.Process.Pid)
			children[i] = n
		}
	}
}

// splitGroups splits "-- a b -- c d" into [[a b] [c d]]; flag parsing has
// already consumed the first "--".
func splitGroups(args []string) [][]string {
	var groups [][]string
	var cur []string
	for _, a := range args {
		if a == "--" {
			if len(cur) > 0 {
				groups = append(groups, cur)
			}
			cur = nil
			continue
		}
		cur = append(cur, a)
	}
	if len(cur) > 0 {
		groups = append(groups, cur)
	}
	return groups
}

// startChild starts "self ARGS..." (or, for "exec:NAME PROGRAM ARGS...",
// PROGRAM ARGS... under NAME) with output and PID file as configured; the
// child is sent to exited once it has terminated.
func startChild(self string, args []string, logDir, pidDir string, exited chan<- *child) (*child, error) {
	c := &child{name: args[0], args: args, done: make(chan struct{})}
	if name, ok := strings.CutPrefix(args[0], "exec:"); ok {
		if name == "" || len(args) < 2 {
			return nil, fmt.Errorf("%q needs a name and a program: exec:NAME PROGRAM ARGS", args[0])
		}
		c.name = name
		c.cmd = exec.Command(args[1], args[2:]...)
	} else {
		c.cmd = exec.Command(self, args...)
	}
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	var out io.Writer = os.Stderr
	var logFile *os.File
	if logDir != "" {
		f, err := os.OpenFile(filepath.Join(logDir, c.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, err
		}
		logFile, out = f, f
	}
	c.cmd.Stdout, c.cmd.Stderr = out, out
	err := c.cmd.Start()
	if logFile != nil {
		// The child holds its own descriptor now (or never started).
		logFile.Close()
	}
	if err != nil {
		return nil, err
	}
	if pidDir != "" {
		c.pidFile = filepath.Join(pidDir, c.name+".pid")
		if err := os.WriteFile(c.pidFile, []byte(strconv.Itoa(c.cmd.Process.Pid)+"\n"), 0o644); err != nil {
			_ = c.cmd.Process.Kill()
			_ = c.cmd.Wait()
			return nil, err
		}
	}
	go func() {
		c.err = c.cmd.Wait()
		if c.pidFile != "" {
			_ = os.Remove(c.pidFile)
		}
		close(c.done)
		exited <- c
	}()
	return c, nil
}

// stopChildren stops children in reverse start order: SIGTERM, then SIGKILL
// after timeout, waiting for each to be gone before the next.
func stopChildren(children []*child, timeout time.Duration) {
	for i := len(children) - 1; i >= 0; i-- {
		c := children[i]
		select {
		case <-c.done:
			continue
		default:
		}
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
			fmt.Fprintf(os.Stderr, "all: %s stopped: %v\n", c.name, exitText(c.err))
		case <-time.After(timeout):
			fmt.Fprintf(os.Stderr, "all: %s still running %s after SIGTERM, killing it\n", c.name, timeout)
			_ = c.cmd.Process.Kill()
			<-c.done
		}
	}
}

// exitText describes a Wait result for the log.
func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}
