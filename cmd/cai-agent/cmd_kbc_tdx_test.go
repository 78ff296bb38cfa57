package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

// fakeTDX points every command's --tee tdx at the TDX runtime on fakes: go-configfs-tsm's
// faketsm answering the real cos-113 quote with REPORTDATA patched to the inblob (a fake whose
// signature no longer verifies), the cos-113 firmware CCEL and a fake kernel with the tsm-mr
// sysfs files.
func fakeTDX(t *testing.T) *rtmrtest.Kernel {
	t.Helper()
	quote, err := os.ReadFile(repoFixture("tdx/cos-113-tdx-quote.dat"))
	require.NoError(t, err)
	ccelData, err := os.ReadFile(repoFixture("tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	root := t.TempDir()
	ccel := filepath.Join(root, evidence.CCELPath)
	require.NoError(t, os.MkdirAll(filepath.Dir(ccel), 0o755))
	require.NoError(t, os.WriteFile(ccel, ccelData, 0o444))
	k := &rtmrtest.Kernel{Root: root, Sysfs: true}
	platformHook = func(o *evidence.Options) {
		o.Root, o.Kernel = root, k
		o.TSM = evidencetest.TSM(quote, true, "tdx_guest")
	}
	t.Cleanup(func() { platformHook = nil })
	return k
}

// devKBS runs `cai-agent dev-kbs args…` on 127.0.0.1:0 until the test ends and returns its
// address and its stderr (complete once stop has returned).
func devKBS(t *testing.T, args ...string) (addr string, stop func() string) {
	t.Helper()
	addrFile := filepath.Join(t.TempDir(), "addr")
	ctx, cancel := context.WithCancel(context.Background())
	var kbsOut, kbsErr lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, append([]string{"cai-agent", "dev-kbs", "--listen", "127.0.0.1:0", "--addr-file", addrFile}, args...),
			nil, &kbsOut, &kbsErr)
	}()
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(b))
		return err == nil && addr != ""
	}, 10*time.Second, 10*time.Millisecond, "dev-kbs did not start")
	stopped := false
	stop = func() string {
		if !stopped {
			stopped = true
			cancel()
			select {
			case code := <-done:
				require.Equal(t, ExitOK, code, kbsErr.String())
			case <-time.After(10 * time.Second):
				t.Fatal("dev-kbs did not stop")
			}
			require.Empty(t, kbsOut.String())
		}
		return kbsErr.String()
	}
	t.Cleanup(func() { stop() })
	return addr, stop
}

const itaKeyID = "4a1c2f5e-5d5b-4a3c-9c1e-0d1f2e3a4b5c"

// The CLI's ITA key broker client end to end on (fake) TDX hardware: dev-kbs --kbc ita
// issues a nonce, checks that the quote's REPORTDATA binds it and the RSA user_data, and wraps
// the key; get-resource --kbc ita unwraps it. A server demanding a nonce refuses evidence
// without one (exit 11).
func TestGetResourceITAOnTDX(t *testing.T) {
	fakeTDX(t)
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	require.NoError(t, os.WriteFile(secret, []byte("s3cr3t-ita-model-key"), 0o600))
	addr, stop := devKBS(t, "--kbc", "ita", "--require-nonce", "--resource", "ita:///keys/"+strings.ToUpper(itaKeyID)+"=@"+secret)

	get := func(out string, extra ...string) (int, string) {
		code, stdout, stderr := runCLI(t, append([]string{"--tee", "tdx", "get-resource", "--kbc", "ita",
			"--kbs-url", "http://" + addr, "--insecure-http", "--resource", itaKeyID, "--out", out}, extra...)...)
		require.Empty(t, stdout)
		require.NotContains(t, stderr, "s3cr3t")
		return code, stderr
	}
	code, stderr := get(filepath.Join(dir, "nonce-less"))
	require.Equal(t, ExitKBS, code, stderr)
	require.Contains(t, stderr, "a nonce is required")
	require.NoFileExists(t, filepath.Join(dir, "nonce-less"))

	code, stderr = get(filepath.Join(dir, "key"), "--ita-nonce")
	require.Equal(t, ExitOK, code, stderr)
	got, err := os.ReadFile(filepath.Join(dir, "key"))
	require.NoError(t, err)
	require.Equal(t, "s3cr3t-ita-model-key", string(got))

	log := stop()
	require.Contains(t, log, "Intel Trust Authority KBS v1")
	require.Contains(t, log, "path=/kbs/v1/keys/"+itaKeyID+"/transfer status=401")
	require.Contains(t, log, "path=/kbs/v1/keys/"+itaKeyID+"/transfer status=200")
	require.NotContains(t, log, "s3cr3t")
}

// fetch-and-decrypt --kbc ita on (fake) TDX: the binaries are measured into RTMR3 (the fake
// kernel's sysfs) before the key is released, the model after it; the summary's RTMR3 is the
// fake register's.
func TestFetchAndDecryptITAOnTDX(t *testing.T) {
	k := fakeTDX(t)
	in := tinyEncryptedModel(t, "ita:///keys/"+itaKeyID)
	addr, stop := devKBS(t, "--kbc", "ita", "--resource", itaKeyID+"=@"+in("model.key"))

	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"cai-agent", "--tee", "tdx", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out"), "--allow-non-tmpfs", "--kbc", "ita", "--ita-nonce",
		"--kbs-url", "http://" + addr, "--insecure-http", "--measure-binary", in("model.key"), "--no-progress", "--json"},
		strings.NewReader(""), &out, &errb)
	require.Equal(t, ExitOK, code, errb.String())
	requireTDXFetch(t, k, in, out.Bytes())
	require.Contains(t, stop(), "/transfer status=200")
}

// requireTDXFetch checks a fetch-and-decrypt --json summary of tinyEncryptedModel on fake TDX
// with one --measure-binary: one file, one binary and the model measured (two extensions of
// the fake RTMR3, whose value the summary reports), the plaintext published.
func requireTDXFetch(t *testing.T, k *rtmrtest.Kernel, in func(string) string, summary []byte) {
	t.Helper()
	var sum struct {
		Files        int    `json:"files"`
		RTMR3        string `json:"rtmr3"`
		Measurements []struct {
			Operation string `json:"operation"`
		} `json:"measurements"`
	}
	require.NoError(t, json.Unmarshal(summary, &sum), string(summary))
	require.Equal(t, 1, sum.Files)
	rtmr3 := k.RTMR(3)
	require.Equal(t, hex.EncodeToString(rtmr3[:]), sum.RTMR3)
	require.Equal(t, 2, k.Extends(), "one binary and the model")
	require.Len(t, sum.Measurements, 2)
	plain, err := os.ReadFile(in("plain/tiny.gguf"))
	require.NoError(t, err)
	got, err := os.ReadFile(in("out/tiny.gguf"))
	require.NoError(t, err)
	require.True(t, bytes.Equal(plain, got))
}
