// Package verify is the relying party's side of cai-agent attestation: it parses TD quotes
// (v4 and v5) into one neutral Quote, verifies their Intel signature chain offline, replays
// event logs against them, checks a Policy, and verifies the nonce-bound evidence bundles
// that `cai-agent serve` returns (VerifyEvidence).
//
// Nothing here trusts the party that produced the evidence: quotes, event logs and bundles are
// attacker-controlled input. Every check either passes or returns an error wrapping one of the
// sentinels below; a Result is only returned when every check passed.
//
// The split follows go-tdx-guest: ParseQuote (abi) → VerifyQuote (signature chain) →
// Policy.Check (values, for v4 and v5 alike; go-tdx-guest's validate is v4-only).
package verify

import (
	"errors"
	"strings"
)

// Sentinel errors; match them with errors.Is.
var (
	// ErrFormat: the input is not a well-formed quote, event log or evidence bundle.
	ErrFormat = errors.New("malformed evidence")
	// ErrSignature: the quote's signature, QE report or PCK certificate chain does not verify
	// against the Intel SGX Root CA at the verification time (or, with collateral, its TCB
	// status is not acceptable).
	ErrSignature = errors.New("quote signature verification failed")
	// ErrBinding: REPORTDATA does not bind the expected nonce and event log.
	ErrBinding = errors.New("evidence is not bound to the nonce")
	// ErrReplay: the event log does not replay to the quote's RTMRs (or a bundle's decoded
	// measurements disagree with its event log).
	ErrReplay = errors.New("event log does not match the quote")
	// ErrPolicy: the evidence is genuine but its values are not what the policy allows. The
	// error is a *PolicyError listing every failed check.
	ErrPolicy = errors.New("policy check failed")
	// ErrSample: the evidence comes from the unsigned sample TEE and the caller did not allow
	// sample evidence.
	ErrSample = errors.New("unsigned sample evidence refused")
	// ErrBadPolicy: the policy document itself is invalid (unknown field, bad hex, wrong length).
	ErrBadPolicy = errors.New("invalid policy")
)

// PolicyError lists every policy check that failed, one human-readable line each (naming the
// field, the expected and the actual value). errors.Is(err, ErrPolicy) holds for it.
type PolicyError struct {
	Failures []string
}

func (e *PolicyError) Error() string {
	return ErrPolicy.Error() + ": " + strings.Join(e.Failures, "; ")
}

// Is makes errors.Is(e, ErrPolicy) true.
func (e *PolicyError) Is(target error) bool { return target == ErrPolicy }
