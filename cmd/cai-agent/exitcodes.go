package main

import (
	"errors"
	"fmt"
)

// Exit codes are stable: scripts, init containers and systemd units depend on them. Keep the
// README's table in sync.
const (
	ExitOK          = 0  // success
	ExitFailure     = 1  // any other error
	ExitUsage       = 2  // bad command line: unknown flag, missing or conflicting arguments
	ExitWrongKey    = 3  // the key does not open this model (key check failed)
	ExitCorrupt     = 4  // tampered, truncated, reordered or otherwise corrupt encrypted data
	ExitUnsupported = 5  // unknown format version or unsupported input
	ExitNotTmpfs    = 6  // output directory is not on tmpfs/ramfs (see --allow-non-tmpfs)
	ExitLocked      = 7  // another cai-agent holds the output directory's lock
	ExitSource      = 8  // the model source could not be read (I/O, network, HTTP status)
	ExitEvidence    = 9  // evidence could not be gathered (no TEE, configfs-tsm/quote failure)
	ExitVerify      = 10 // evidence, quote, event log replay or policy verification failed
	ExitKBS         = 11 // the key broker refused or failed to release the key
	ExitMeasure     = 12 // RTMR extension or event log failure
	// ExitInterrupted: SIGINT or SIGTERM arrived and the command failed because of it (128 +
	// SIGINT, as shells report it). Commands that serve until stopped exit 0 instead.
	ExitInterrupted = 130
)

// exitMapping maps a sentinel error (matched with errors.Is) to an exit code.
type exitMapping struct {
	err  error
	code int
}

// exitMappings lists every area's mappings; the first match wins, so areas put their most
// specific errors first. Each area declares its own slice in its command file.
func exitMappings() [][]exitMapping {
	return [][]exitMapping{cryptoExitCodes, evidenceExitCodes, verifyExitCodes, kbcExitCodes, agentExitCodes, serveExitCodes}
}

func exitCode(err error) int {
	var ue usageError
	if errors.As(err, &ue) {
		return ExitUsage
	}
	for _, area := range exitMappings() {
		for _, m := range area {
			if errors.Is(err, m.err) {
				return m.code
			}
		}
	}
	return ExitFailure
}

// usageError marks a command-line mistake (exit code 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}
