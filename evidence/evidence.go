// Package evidence is how cai-agent proves which platform, binaries and model are running:
// it gathers TEE evidence (TDX quotes through configfs-tsm, or the sample TEE for development),
// measures events into RTMR3 while keeping a replayable event log, and verifies such evidence.
//
// The types in this file are the contract other packages (kbc, agent) depend on: they take an
// Attester and a Measurer, never a concrete TEE, so tests inject fakes.
package evidence

import (
	"context"
)

// TEE names, spelled as Confidential Containers Trustee spells them.
const (
	TEETDX    = "tdx"
	TEESample = "sample"
)

// Evidence is what an Attester produces for one REPORTDATA value.
//
// Its JSON form is the one `cai-agent evidence --json` prints:
// {"tee":…,"quote":<std base64>,"cc_eventlog":<std base64 or null>}.
type Evidence struct {
	// TEE is TEETDX or TEESample.
	TEE string `json:"tee"`
	// Quote is, for TDX, the raw TD quote (v4 or v5) as the kernel returns it; for the sample
	// TEE, the JSON document of the sample quote (unsigned; see the sample TEE's docs).
	Quote []byte `json:"quote"`
	// CCEventLog is the firmware CCEL (trimmed at its end marker) followed by the agent's own
	// RTMR3 records and 8 bytes of 0xFF, exactly as Trustee replays it; nil when there is none.
	CCEventLog []byte `json:"cc_eventlog"`
}

// Attester produces evidence binding caller-chosen REPORTDATA.
type Attester interface {
	// TEE returns TEETDX or TEESample.
	TEE() string
	// Attest returns fresh evidence whose REPORTDATA is reportData. Implementations
	// serialize concurrent calls where the hardware interface requires it.
	Attest(ctx context.Context, reportData [64]byte) (*Evidence, error)
}

// Event is one runtime measurement: the text "domain operation content" of an AAEL event.
// Domain and Operation contain no whitespace; Content contains no newline.
type Event struct {
	Domain    string `json:"domain"`
	Operation string `json:"operation"`
	Content   string `json:"content"`
}

// Measurer extends RTMR3 with events, recording each one in the agent's event log before the
// extension happens, so that RTMR3 can always be replayed from the log.
type Measurer interface {
	// Measure logs ev and extends RTMR3 with SHA-384 of its AAEL tagged form. It returns the
	// 48-byte digest that was extended.
	Measure(ctx context.Context, ev Event) ([]byte, error)
}

// The measurement domain and operations cai-agent itself uses. Content is RFC 8785 canonical
// JSON; see the README ("Measurements") for the schema a verifier's policy can rely on.
const (
	// Domain is the AAEL domain of every event cai-agent records.
	Domain = "github.com/cai-agent"
	// OpBinary measures a file that will run or touch the model. Content:
	// {"path":"<absolute path>","sha384":"<hex>"}.
	OpBinary = "Binary"
	// OpModel measures a decrypted model before it is published. Content:
	// {"manifest_sha256":"<hex>","name":"<model name>"}; for Ollama models manifest_sha256 is
	// the sha256 of the Ollama manifest file (the ID `ollama list` shows).
	OpModel = "Model"
)
