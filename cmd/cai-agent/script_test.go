package main

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"cai-agent": func() { os.Exit(Main()) },
	})
}

// TestScripts runs the CLI scripts in testdata/script: each *.txtar is a self-contained
// session of cai-agent commands with their expected output and exit codes.
//
// Besides testscript's built-ins, scripts can use:
//
//	exitcode N prog args...   run prog and require exit code N (stdout/stderr kept for matching)
//	waitfile VAR FILE         wait (up to 60 s) until FILE is non-empty; set VAR to its first line
//
// and the variable $SHM: a fresh directory on tmpfs (/dev/shm), removed after the script,
// for commands that refuse to write plaintext elsewhere.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(env *testscript.Env) error {
			env.Setenv("CAI_STATE_DIR", env.WorkDir+"/state")
			if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
				shm, err := os.MkdirTemp("/dev/shm", "cai-agent-script-")
				if err != nil {
					return err
				}
				env.Defer(func() { os.RemoveAll(shm) })
				env.Setenv("SHM", shm)
			}
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"exitcode": cmdExitCode,
			"waitfile": cmdWaitFile,
		},
	})
}

func cmdExitCode(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exitcode N prog args...")
	}
	want, err := strconv.Atoi(args[0])
	if err != nil {
		ts.Fatalf("exitcode: %v", err)
	}
	err = ts.Exec(args[1], args[2:]...)
	got := 0
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		got = ee.ExitCode()
	default:
		// testscript reports a non-zero exit as a plain error carrying the status text.
		got = -1
		if s := err.Error(); len(s) > 12 && s[:12] == "exit status " {
			got, _ = strconv.Atoi(s[12:])
		}
	}
	if got != want {
		ts.Fatalf("exit code %d, want %d (%v)", got, want, err)
	}
}

func cmdWaitFile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: waitfile VAR FILE")
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, err := os.ReadFile(ts.MkAbs(args[1]))
		if line, _, _ := strings.Cut(string(b), "\n"); err == nil && line != "" {
			ts.Setenv(args[0], line)
			return
		}
		if time.Now().After(deadline) {
			ts.Fatalf("waitfile: %s still empty or missing", args[1])
		}
		time.Sleep(20 * time.Millisecond)
	}
}
