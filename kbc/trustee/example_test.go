package trustee_test

import (
	"context"
	"fmt"
	"net/http/httptest"

	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

// Fetch a resource from a Trustee KBS (here the test server, over plain HTTP; a real KBS is
// https:// and needs no InsecureHTTP). In an agent the Attester is an *evidence.Platform.
func Example() {
	kbs := kbstest.NewTrustee()
	kbs.SetResource("kbs:///default/model/key", []byte("model key"))
	srv := httptest.NewServer(kbs)
	defer srv.Close()

	c, err := trustee.New(trustee.Options{
		URL:      srv.URL,
		Attester: kbstest.SampleAttester{},
		HTTP:     kbc.HTTPOptions{InsecureHTTP: true},
	})
	if err != nil {
		panic(err)
	}
	secret, err := c.GetResource(context.Background(), "kbs:///default/model/key")
	if err != nil {
		panic(err)
	}
	fmt.Println(len(secret), "bytes released")
	// Output: 9 bytes released
}
