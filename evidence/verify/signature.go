package verify

import (
	"context"
	"crypto/x509"
	_ "embed"
	"encoding/pem"
	"fmt"
	"time"

	"github.com/google/go-tdx-guest/verify"
	"github.com/google/go-tdx-guest/verify/trust"
)

// intelRootPEM is the Intel SGX Root CA (CN=Intel SGX Root CA, valid 2018-05-21..2049-12-31),
// byte for byte go-tdx-guest's verify/trusted_root.pem; it is also the root embedded in every
// PCK chain of the fixture quotes (checked by the tests). It is public, so embedding it is fine;
// passing it explicitly keeps go-tdx-guest from printing a warning on stdout.
//
//go:embed intel_sgx_root_ca.pem
var intelRootPEM []byte

var intelRoot = func() *x509.Certificate {
	b, _ := pem.Decode(intelRootPEM)
	if b == nil {
		panic("verify: embedded Intel SGX Root CA is not PEM")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		panic("verify: embedded Intel SGX Root CA: " + err.Error())
	}
	return c
}()

// IntelRootCA returns the Intel SGX Root CA certificate quotes are verified against by default.
func IntelRootCA() *x509.Certificate { return intelRoot }

// Options control verification. The zero value verifies offline, now, against the Intel SGX
// Root CA, and refuses sample evidence.
type Options struct {
	// Now is the time at which the PCK certificate chain (and collateral) must be valid; the
	// zero value means time.Now(). Pin it to check old evidence or in tests.
	Now time.Time
	// Collateral additionally fetches Intel PCS collateral (TCB info, QE identity, PCK and
	// root CRLs) for the quote's FMSPC — an ONLINE operation through Getter — and checks
	// revocation, the collateral's signatures and expiry, and that the TDX module's and QE's
	// TCB levels match a level Intel lists. Without it, TCB status and revocation are not
	// checked: only the signature chain is.
	Collateral bool
	// Getter answers PCS requests when Collateral is set; nil means HTTPS to Intel PCS
	// (api.trustedservices.intel.com). Use it to serve cached collateral offline.
	Getter trust.HTTPSGetter
	// Roots are the trusted roots; nil means IntelRootCA() only.
	Roots *x509.CertPool
	// AllowSample accepts evidence of the sample TEE (never signed: Result.Unsigned is set).
	// Without it such evidence fails with ErrSample.
	AllowSample bool

	// signature replaces the signature check; only this package's tests set it, to exercise
	// the binding, replay and policy logic on quotes whose REPORTDATA they patched (and whose
	// signature therefore no longer verifies). The real check is tested on unpatched quotes.
	signature func(ctx context.Context, proto any, opts Options) error
}

func (o Options) now() time.Time {
	if o.Now.IsZero() {
		return time.Now()
	}
	return o.Now
}

// VerifyQuote parses raw (ParseQuote) and verifies it with go-tdx-guest's verify: the quote's
// ECDSA signature over header and body with the attestation key, the QE report's signature by
// the PCK leaf certificate, the QE report data binding the attestation key, and the PCK chain
// (leaf → Intel SGX PCK Platform/Processor CA → Intel SGX Root CA) at opts.Now against
// opts.Roots. With opts.Collateral it also checks TCB status and revocation online. It does
// not judge any measured value: use a Policy. Errors wrap ErrFormat or ErrSignature.
func VerifyQuote(ctx context.Context, raw []byte, opts Options) (*Quote, error) {
	q, p, err := parseQuote(raw)
	if err != nil {
		return nil, err
	}
	if err := checkSignature(ctx, p, opts); err != nil {
		return nil, err
	}
	return q, nil
}

func checkSignature(ctx context.Context, p any, opts Options) (err error) {
	// Like its parser, go-tdx-guest's verifier must not crash a verifying server on hostile
	// input.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: malformed TD quote (verification failed: %v)", ErrFormat, r)
		}
	}()
	if opts.signature != nil {
		return opts.signature(ctx, p, opts)
	}
	roots := opts.Roots
	if roots == nil {
		roots = x509.NewCertPool()
		roots.AddCert(intelRoot)
	}
	now := opts.now()
	vo := &verify.Options{
		TrustedRoots: roots,
		Now:          &verify.TimeSet{PckCertChain: now, TcbInfo: now, QeIdentity: now, PckCrl: now, RootCaCrl: now},
	}
	if opts.Collateral {
		vo.GetCollateral, vo.CheckRevocations = true, true
		vo.Getter = opts.Getter
		if vo.Getter == nil {
			vo.Getter = trust.DefaultHTTPSGetter()
		}
	}
	if err := verify.TdxQuoteContext(ctx, p, vo); err != nil {
		return fmt.Errorf("%w: %v (verification time %s)", ErrSignature, err, now.UTC().Format(time.RFC3339))
	}
	return nil
}
