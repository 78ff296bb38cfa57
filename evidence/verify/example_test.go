package verify_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cai-agent/cai-agent/evidence/verify"
)

// Verify a real TD quote offline at a pinned time, then check it against a policy.
func ExampleVerifyQuote() {
	raw, err := os.ReadFile("../../testdata/tdx/quote_v5_sample.dat")
	if err != nil {
		panic(err)
	}
	q, err := verify.VerifyQuote(context.Background(), raw, verify.Options{Now: time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)})
	if err != nil {
		panic(err)
	}
	fmt.Println("version", q.Version, "mr_td", q.MRTD.String()[:16], "debug", q.Debug)

	policy, err := verify.ParsePolicy(strings.NewReader(`{"mr_td":"` + strings.Repeat("00", 48) + `","min_tee_tcb_svn":"0c000000000000000000000000000000"}`))
	if err != nil {
		panic(err)
	}
	var pe *verify.PolicyError
	if err := policy.Check(q, nil); errors.As(err, &pe) {
		for _, f := range pe.Failures {
			fmt.Println("policy:", f[:60])
		}
	}
	// Output:
	// version 5 mr_td 7348651a34b2d2d3 debug false
	// policy: mr_td 7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc6
	// policy: tee_tcb_svn 0b010400000000000000000000000000 is below min_te
}
