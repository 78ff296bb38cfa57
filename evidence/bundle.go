package evidence

// Bundle is the nonce-bound evidence `cai-agent serve` returns from GET /v1/evidence and that
// `cai-agent verify --evidence FILE --nonce N` checks. Its JSON form:
//
//	{"tee":"tdx","quote":"<std b64>","cc_eventlog":"<std b64>"|null,"report_data":"<hex>",
//	 "measurements":[{"domain":…,"operation":…,"content":…,"digest":"<hex sha384>"}…],
//	 "model":{"name":…,"manifest_sha256":…}|null}
//
// ReportData must equal NonceReportData(nonce, CCEventLog). Measurements and Model are a
// convenience decoded from the RTMR3 events of CCEventLog: a verifier never trusts them, it
// recomputes them from the log, replays the log against the quote, and compares.
type Bundle struct {
	TEE          string        `json:"tee"`
	Quote        []byte        `json:"quote"`
	CCEventLog   []byte        `json:"cc_eventlog"`
	ReportData   string        `json:"report_data"`
	Measurements []Measurement `json:"measurements"`
	Model        *ModelInfo    `json:"model"`
}

// Measurement is one RTMR3 event with the SHA-384 digest that was extended.
type Measurement struct {
	Event
	Digest string `json:"digest"`
}

// ModelInfo names the model the last OpModel event measured.
type ModelInfo struct {
	Name           string `json:"name"`
	ManifestSHA256 string `json:"manifest_sha256"`
}
