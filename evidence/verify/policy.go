package verify

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/cai-agent/cai-agent/evidence"
)

// Policy says which evidence a relying party accepts. Every field is optional: an absent
// (null) field is not checked. Byte values are hex. Its JSON form (unknown fields rejected):
//
//	{
//	  "mr_td": "<hex48>" | ["<hex48>", …],      any of
//	  "mr_seam": "<hex48>" | ["<hex48>", …],    any of
//	  "rtmr0": "<hex48>", "rtmr1": …, "rtmr2": …, "rtmr3": …,
//	  "mr_config_id": "<hex48>", "mr_owner": "<hex48>", "mr_owner_config": "<hex48>",
//	  "report_data": "<hex64>",
//	  "td_attributes": "<hex8>", "xfam": "<hex8>",
//	  "mr_signer_seam": "<hex48>", "seam_attributes": "<hex8>",
//	  "allow_debug": false,
//	  "min_tee_tcb_svn": "<hex16>", "min_tee_tcb_svn2": "<hex16>",
//	  "mr_servicetd": "<hex48>",
//	  "require_boot_log": false,
//	  "allowed_binaries": [{"sha384": "<hex48>", "path": "/usr/bin/ollama"}, …],
//	  "model": {"name": "…", "manifest_sha256": "<hex32>"},
//	  "required_measurements": [{"domain": …, "operation": …, "content": …}, …],
//	  "only_known_events": false
//	}
//
// The debug bit is always checked: a debuggable TD is refused unless allow_debug is true.
type Policy struct {
	// MRTD: the TD's initial measurement (firmware) must be one of these.
	MRTD HexList `json:"mr_td,omitempty"`
	// MRSEAM: the TDX module's measurement must be one of these.
	MRSEAM HexList `json:"mr_seam,omitempty"`
	// RTMR0..RTMR3: exact values.
	RTMR0 Hex `json:"rtmr0,omitempty"`
	RTMR1 Hex `json:"rtmr1,omitempty"`
	RTMR2 Hex `json:"rtmr2,omitempty"`
	RTMR3 Hex `json:"rtmr3,omitempty"`
	// MRConfigID, MROwner, MROwnerConfig: exact values.
	MRConfigID    Hex `json:"mr_config_id,omitempty"`
	MROwner       Hex `json:"mr_owner,omitempty"`
	MROwnerConfig Hex `json:"mr_owner_config,omitempty"`
	// ReportData: exact REPORTDATA (for raw quotes; bundles are bound to a nonce instead).
	ReportData Hex `json:"report_data,omitempty"`
	// TDAttributes, XFAM: exact TD_ATTRIBUTES (e.g. SEPT_VE_DISABLE, PKS, KL; DEBUG is judged
	// by AllowDebug as well) and XFAM (the CPU extended features the TD may use), as the
	// quote encodes them (8 bytes, little-endian).
	TDAttributes Hex `json:"td_attributes,omitempty"`
	XFAM         Hex `json:"xfam,omitempty"`
	// MRSignerSEAM, SEAMAttributes: exact values (all zero for Intel's TDX module).
	MRSignerSEAM   Hex `json:"mr_signer_seam,omitempty"`
	SEAMAttributes Hex `json:"seam_attributes,omitempty"`
	// AllowDebug accepts a TD whose TD_ATTRIBUTES.DEBUG bit is set. Never in production.
	AllowDebug bool `json:"allow_debug,omitempty"`
	// MinTEETCBSVN: every byte (component SVN) of TEE_TCB_SVN must be ≥ the same byte here,
	// as Intel compares TDX TCB components.
	MinTEETCBSVN Hex `json:"min_tee_tcb_svn,omitempty"`
	// MinTEETCBSVN2: the same for TEE_TCB_SVN2, the SVN of the TDX module running now (it
	// differs from TEE_TCB_SVN after a TD-preserving module update). Only TDX 1.5 quotes (v5,
	// body type 3) have it: any other quote fails a policy that sets it.
	MinTEETCBSVN2 Hex `json:"min_tee_tcb_svn2,omitempty"`
	// MRServiceTD: exact MR_SERVICETD (the service TDs bound to this TD, e.g. a migration
	// TD; all zero when none is). Only TDX 1.5 quotes have it: any other quote fails a policy
	// that sets it.
	MRServiceTD Hex `json:"mr_servicetd,omitempty"`
	// RequireBootLog compares RTMR0..2 with the event log even when the log has no events for
	// them (by default they are compared only when the log covers boot, i.e. is a CCEL), so
	// evidence without the firmware log is refused.
	RequireBootLog bool `json:"require_boot_log,omitempty"`
	// AllowedBinaries: when present (even empty), every cai-agent Binary event in RTMR3 must
	// have one of these SHA-384 digests (and, if the entry names a path, that path), and RTMR3
	// must have no record that is not an AAEL event (it could be a binary in disguise).
	AllowedBinaries []Binary `json:"allowed_binaries,omitempty"`
	// Model: the last cai-agent Model event in RTMR3 must name this model (each given field
	// must match), and no RTMR3 record that is not an AAEL event may follow it.
	Model *ModelRule `json:"model,omitempty"`
	// RequiredMeasurements: each of these events must be among the RTMR3 events.
	RequiredMeasurements []evidence.Event `json:"required_measurements,omitempty"`
	// OnlyKnownEvents refuses any RTMR3 event that is not a cai-agent Binary or Model event
	// or listed in RequiredMeasurements (including events that are not AAEL events at all).
	OnlyKnownEvents bool `json:"only_known_events,omitempty"`
}

// Binary is an allowed measured binary.
type Binary struct {
	SHA384 Hex    `json:"sha384"`
	Path   string `json:"path,omitempty"`
}

// ModelRule is the expected model; at least one field is set.
type ModelRule struct {
	Name           string `json:"name,omitempty"`
	ManifestSHA256 Hex    `json:"manifest_sha256,omitempty"`
}

// HexList is a list of byte strings whose JSON form is one hex string or an array of them.
type HexList []Hex

// UnmarshalJSON implements json.Unmarshaler.
func (l *HexList) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	if bytes.HasPrefix(bytes.TrimSpace(b), []byte(`"`)) {
		var h Hex
		if err := h.UnmarshalJSON(b); err != nil {
			return err
		}
		*l = HexList{h}
		return nil
	}
	var hs []Hex
	if err := json.Unmarshal(b, &hs); err != nil {
		return err
	}
	*l = hs
	return nil
}

// ParsePolicy reads a JSON policy, rejecting unknown fields, trailing data and values of the
// wrong length. Errors wrap ErrBadPolicy.
func ParsePolicy(r io.Reader) (*Policy, error) {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPolicy, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: trailing data after the policy object", ErrBadPolicy)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// ParsePolicyYAML reads the same policy written as YAML: it is converted to JSON and parsed
// by ParsePolicy, so the same fields and checks apply. Quote hex values ("0300…"): YAML reads
// unquoted digit strings as numbers, which are rejected.
func ParsePolicyYAML(r io.Reader) (*Policy, error) {
	var v any
	dec := yaml.NewDecoder(r)
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("%w: yaml: %v", ErrBadPolicy, err)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: yaml: more than one document", ErrBadPolicy)
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, fmt.Errorf("%w: yaml: the policy is not a mapping", ErrBadPolicy)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("%w: yaml: %v", ErrBadPolicy, err)
	}
	return ParsePolicy(bytes.NewReader(b))
}

// LoadPolicy reads a policy file: YAML if its name ends in .yaml or .yml, JSON otherwise.
func LoadPolicy(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPolicy, err)
	}
	defer f.Close()
	parse := ParsePolicy
	if ext := strings.ToLower(filepath.Ext(path)); ext == ".yaml" || ext == ".yml" {
		parse = ParsePolicyYAML
	}
	p, err := parse(io.LimitReader(f, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, nil
}

// Validate checks the lengths of every value. Errors wrap ErrBadPolicy.
func (p *Policy) Validate() error {
	var errs []string
	size := func(name string, h Hex, n int) {
		if h != nil && len(h) != n {
			errs = append(errs, fmt.Sprintf("%s is %d bytes, want %d", name, len(h), n))
		}
	}
	for i, h := range p.MRTD {
		size(fmt.Sprintf("mr_td[%d]", i), h, 48)
	}
	for i, h := range p.MRSEAM {
		size(fmt.Sprintf("mr_seam[%d]", i), h, 48)
	}
	for i, h := range []Hex{p.RTMR0, p.RTMR1, p.RTMR2, p.RTMR3} {
		size(fmt.Sprintf("rtmr%d", i), h, 48)
	}
	size("mr_config_id", p.MRConfigID, 48)
	size("mr_owner", p.MROwner, 48)
	size("mr_owner_config", p.MROwnerConfig, 48)
	size("report_data", p.ReportData, 64)
	size("td_attributes", p.TDAttributes, 8)
	size("xfam", p.XFAM, 8)
	size("mr_signer_seam", p.MRSignerSEAM, 48)
	size("seam_attributes", p.SEAMAttributes, 8)
	size("min_tee_tcb_svn", p.MinTEETCBSVN, 16)
	size("min_tee_tcb_svn2", p.MinTEETCBSVN2, 16)
	size("mr_servicetd", p.MRServiceTD, 48)
	for i, b := range p.AllowedBinaries {
		if len(b.SHA384) != 48 {
			errs = append(errs, fmt.Sprintf("allowed_binaries[%d].sha384 is %d bytes, want 48", i, len(b.SHA384)))
		}
	}
	if m := p.Model; m != nil {
		if m.Name == "" && m.ManifestSHA256 == nil {
			errs = append(errs, "model needs name and/or manifest_sha256")
		}
		size("model.manifest_sha256", m.ManifestSHA256, 32)
	}
	for i, ev := range p.RequiredMeasurements {
		if err := ev.Validate(); err != nil {
			errs = append(errs, fmt.Sprintf("required_measurements[%d]: %v", i, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %s", ErrBadPolicy, strings.Join(errs, "; "))
	}
	return nil
}

// checkQuote appends a failure line for every quote value the policy rejects.
func (p *Policy) checkQuote(q *Quote, fail func(string, ...any)) {
	anyOf := func(name string, l HexList, got Hex) {
		if l == nil {
			return
		}
		for _, w := range l {
			if bytes.Equal(w, got) {
				return
			}
		}
		fail("%s %x is not one of the %d allowed values", name, []byte(got), len(l))
	}
	exact := func(name string, want, got Hex) {
		if want != nil && !bytes.Equal(want, got) {
			fail("%s is %x, want %x", name, []byte(got), []byte(want))
		}
	}
	anyOf("mr_td", p.MRTD, q.MRTD)
	anyOf("mr_seam", p.MRSEAM, q.MRSEAM)
	for i, w := range []Hex{p.RTMR0, p.RTMR1, p.RTMR2, p.RTMR3} {
		exact(fmt.Sprintf("rtmr%d", i), w, q.rtmr(i))
	}
	exact("mr_config_id", p.MRConfigID, q.MRConfigID)
	exact("mr_owner", p.MROwner, q.MROwner)
	exact("mr_owner_config", p.MROwnerConfig, q.MROwnerConfig)
	exact("report_data", p.ReportData, q.ReportData)
	exact("td_attributes", p.TDAttributes, q.TDAttributes)
	exact("xfam", p.XFAM, q.XFAM)
	exact("mr_signer_seam", p.MRSignerSEAM, q.MRSignerSEAM)
	exact("seam_attributes", p.SEAMAttributes, q.SEAMAttributes)
	if q.Debug && !p.AllowDebug {
		fail("the TD is debuggable (td_attributes %x has DEBUG set) and allow_debug is false", []byte(q.TDAttributes))
	}
	minSVN("tee_tcb_svn", p.MinTEETCBSVN, q.TEETCBSVN, fail)
	minSVN("tee_tcb_svn2", p.MinTEETCBSVN2, q.TEETCBSVN2, fail)
	if p.MRServiceTD != nil && q.MRServiceTD == nil {
		fail("mr_servicetd %x required but the quote has none (not a TDX 1.5 quote)", []byte(p.MRServiceTD))
	} else {
		exact("mr_servicetd", p.MRServiceTD, q.MRServiceTD)
	}
}

// minSVN fails unless every byte (component SVN) of got is ≥ the same byte of min, as Intel
// compares TDX TCB components. A nil min checks nothing.
func minSVN(name string, min, got Hex, fail func(string, ...any)) {
	if min == nil {
		return
	}
	if len(got) != 16 {
		fail("%s is missing, min_%s %x required", name, name, []byte(min))
		return
	}
	for i := range 16 {
		if got[i] < min[i] {
			fail("%s %x is below min_%s %x (component %d: %d < %d)", name, []byte(got), name, []byte(min), i, got[i], min[i])
			return
		}
	}
}

// needsLog reports whether the policy judges the event log (so one is required).
func (p *Policy) needsLog() bool {
	return p.RequireBootLog || p.AllowedBinaries != nil || p.Model != nil || p.RequiredMeasurements != nil || p.OnlyKnownEvents
}

// checkEvents judges the replayed RTMR3 events.
func (p *Policy) checkEvents(r *Replay, fail func(string, ...any)) {
	if !p.needsLog() {
		return
	}
	if r == nil {
		fail("the policy checks the boot log or measured binaries/model/events but no event log was given")
		return
	}
	if p.AllowedBinaries != nil && r.OtherRTMR3Records > 0 {
		fail("RTMR3 has %d records that are not AAEL events: any of them may be a binary allowed_binaries does not list", r.OtherRTMR3Records)
	}
	for _, m := range r.Measurements {
		if !isOurs(m.Event, evidence.OpBinary) || p.AllowedBinaries == nil {
			continue
		}
		bin, err := parseBinary(m.Content)
		if err != nil {
			fail("binary event %q: %v", m.Content, err)
			continue
		}
		if !slices.ContainsFunc(p.AllowedBinaries, func(a Binary) bool {
			return bytes.Equal(a.SHA384, bin.SHA384) && (a.Path == "" || a.Path == bin.Path)
		}) {
			fail("binary %s (sha384 %x) is not in allowed_binaries", bin.Path, []byte(bin.SHA384))
		}
	}
	if m := p.Model; m != nil {
		switch got := r.Model; {
		case got == nil && r.OtherRTMR3Records > 0:
			fail("no model is known to be measured last (RTMR3 has %d records that are not AAEL events), want %s", r.OtherRTMR3Records, m)
		case got == nil:
			fail("no model was measured, want %s", m)
		case m.Name != "" && got.Name != m.Name, m.ManifestSHA256 != nil && !strings.EqualFold(got.ManifestSHA256, hex.EncodeToString(m.ManifestSHA256)):
			fail("model is %s (manifest_sha256 %s), want %s", got.Name, got.ManifestSHA256, m)
		}
	}
	for _, want := range p.RequiredMeasurements {
		if !slices.ContainsFunc(r.Measurements, func(m evidence.Measurement) bool { return m.Event == want }) {
			fail("required measurement %q was not measured", want.Text())
		}
	}
	if p.OnlyKnownEvents {
		if r.OtherRTMR3Records > 0 {
			fail("RTMR3 has %d records that are not AAEL events and only_known_events is set", r.OtherRTMR3Records)
		}
		for _, m := range r.Measurements {
			if isOurs(m.Event, evidence.OpBinary) || isOurs(m.Event, evidence.OpModel) || slices.Contains(p.RequiredMeasurements, m.Event) {
				continue
			}
			fail("unexpected RTMR3 event %q (only_known_events)", truncate(m.Text(), 120))
		}
	}
}

func (m *ModelRule) String() string {
	var parts []string
	if m.Name != "" {
		parts = append(parts, "name "+m.Name)
	}
	if m.ManifestSHA256 != nil {
		parts = append(parts, "manifest_sha256 "+hex.EncodeToString(m.ManifestSHA256))
	}
	return strings.Join(parts, ", ")
}

func isOurs(ev evidence.Event, op string) bool {
	return ev.Domain == evidence.Domain && ev.Operation == op
}

// parseBinary decodes a Binary event's content strictly.
func parseBinary(content string) (*Binary, error) {
	var c struct {
		Path   string `json:"path"`
		SHA384 Hex    `json:"sha384"`
	}
	dec := json.NewDecoder(strings.NewReader(content))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil || dec.More() {
		return nil, fmt.Errorf("content is not {\"path\",\"sha384\"} JSON")
	}
	if len(c.SHA384) != 48 {
		return nil, fmt.Errorf("sha384 is %d bytes", len(c.SHA384))
	}
	// cai-agent measures canonical JSON: any other form (duplicate or case-variant keys, say)
	// may read differently elsewhere than it does here.
	if ev, err := evidence.BinaryEvent(c.Path, c.SHA384); err != nil || ev.Content != content {
		return nil, fmt.Errorf("content is not canonical JSON")
	}
	return &Binary{Path: c.Path, SHA384: c.SHA384}, nil
}

// Check judges a verified quote and, if one was replayed against it, its event log. It
// returns nil or a *PolicyError listing every failure. A nil Policy accepts anything except a
// debuggable TD.
func (p *Policy) Check(q *Quote, r *Replay) error {
	if p == nil {
		p = &Policy{}
	}
	var pe PolicyError
	fail := func(f string, a ...any) { pe.Failures = append(pe.Failures, fmt.Sprintf(f, a...)) }
	p.checkQuote(q, fail)
	p.checkEvents(r, fail)
	if len(pe.Failures) > 0 {
		return &pe
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
