package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/serve"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/verify"
)

// `cai-agent serve` end to end, in process: configured through CAI_* variables, it serves
// verifiable evidence and measurements on its unix socket (mode 0660), and exits 0 removing
// the socket when its context is cancelled (SIGINT/SIGTERM in main).
func TestServeCommand(t *testing.T) {
	dir, err := os.MkdirTemp("", "caicli")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "run", "agent.sock")
	t.Setenv("CAI_TEE", "sample")
	t.Setenv("CAI_STATE_DIR", filepath.Join(dir, "state"))
	t.Setenv("CAI_SOCKET", sock)
	t.Setenv("CAI_MAX_QUEUE", "4")
	t.Setenv("CAI_QUOTE_TIMEOUT", "20s")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"cai-agent", "serve"}, strings.NewReader(""), &stdout, &stderr) }()

	client := unixClient(sock)
	waitForSocket(t, sock, code, &stderr)
	fi, err := os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o660), fi.Mode().Perm())

	resp, err := client.Post("http://agent"+serve.PathMeasurements, "application/json",
		strings.NewReader(`{"domain":"example.com","operation":"Start","content":"{\"z\":1,\"a\":2}"}`))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)

	body, _, res := getVerifiedEvidence(t, client, "cli-test")
	require.Len(t, res.Measurements, 1)
	assert.Equal(t, `{"a":2,"z":1}`, res.Measurements[0].Content)

	// The relying party's CLI accepts it for this nonce only.
	var vout, verr bytes.Buffer
	rc := run(context.Background(), []string{"cai-agent", "verify", "--evidence", "-", "--nonce", "cli-test", "--allow-sample"}, bytes.NewReader(body), &vout, &verr)
	assert.Equal(t, ExitOK, rc, "verify: %s%s", vout.String(), verr.String())
	vout.Reset()
	verr.Reset()
	rc = run(context.Background(), []string{"cai-agent", "verify", "--evidence", "-", "--nonce", "other", "--allow-sample"}, bytes.NewReader(body), &vout, &verr)
	assert.Equal(t, ExitVerify, rc, "verify: %s%s", vout.String(), verr.String())

	cancel()
	require.Equal(t, ExitOK, <-code, "stderr: %s", stderr.String())
	assert.NoFileExists(t, sock)
	assert.Contains(t, stderr.String(), "serving evidence")
	assert.Contains(t, stderr.String(), "path=/v1/evidence status=200")
	assert.NotContains(t, stderr.String(), "cli-test", "nonces (query strings) are not logged")
	assert.Empty(t, stdout.String())
}

// waitForSocket waits until the command started in the background answers on sock, failing
// the test if it exits first (a startup deadline, not a performance assertion).
func waitForSocket(t *testing.T, sock string, code <-chan int, stderr *lockedBuffer) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return
		}
		select {
		case rc := <-code:
			t.Fatalf("command exited with %d: %s", rc, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("command did not start serving: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// getVerifiedEvidence gets GET /v1/evidence for nonce and verifies it (sample TEE allowed):
// the body, the bundle and the verification result.
func getVerifiedEvidence(t *testing.T, client *http.Client, nonce string) ([]byte, *evidence.Bundle, *verify.Result) {
	t.Helper()
	resp, err := client.Get("http://agent" + serve.PathEvidence + "?nonce=" + nonce)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var b evidence.Bundle
	require.NoError(t, json.Unmarshal(body, &b))
	res, err := verify.VerifyEvidence(context.Background(), &b, nonce, nil, verify.Options{AllowSample: true})
	require.NoError(t, err)
	return body, &b, res
}

func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
}

// `fetch-and-decrypt --serve` publishes the model and then keeps serving evidence whose event
// log holds the binary and model measurements of the run, so a relying party can check the
// model it is talking to.
func TestFetchAndDecryptServe(t *testing.T) {
	dir, err := os.MkdirTemp("", "caicli")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	in := func(name string) string { return filepath.Join(dir, name) }
	for _, args := range [][]string{
		{"dev-tiny-model", "--ollama-models", in("plain"), "--name", "cai-tiny"},
		{"keygen", "--out", in("model.key")},
		{"encrypt", "--key-file", in("model.key"), "--in", in("plain"), "--out", in("enc"), "--ollama-model", "cai-tiny", "--key-hint", "kbs:///default/model-key/cai-tiny"},
	} {
		var out, errb bytes.Buffer
		rc := run(context.Background(), append([]string{"cai-agent"}, args...), strings.NewReader(""), &out, &errb)
		require.Equal(t, ExitOK, rc, "%v: %s", args, errb.String())
	}
	sock := in("run/agent.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, []string{"cai-agent", "--tee", "sample", "--state-dir", in("state"),
			"fetch-and-decrypt", "--source", in("enc"), "--ollama-models", in("models"), "--allow-non-tmpfs",
			"--kbc", "offline", "--key-file", in("model.key"), "--measure-binary", in("model.key"),
			"--no-progress", "--serve", "--socket", sock}, strings.NewReader(""), &stdout, &stderr)
	}()
	waitForSocket(t, sock, code, &stderr)
	assert.FileExists(t, in("models/manifests/registry.ollama.ai/library/cai-tiny/latest"), "published before serving")

	_, b, res := getVerifiedEvidence(t, unixClient(sock), "chat-42")
	var ops []string
	for _, m := range res.Measurements {
		ops = append(ops, m.Operation)
	}
	assert.Equal(t, []string{evidence.OpBinary, evidence.OpModel}, ops)
	require.NotNil(t, b.Model)
	assert.Equal(t, "registry.ollama.ai/library/cai-tiny:latest", b.Model.Name)

	cancel()
	require.Equal(t, ExitOK, <-code, "stderr: %s", stderr.String())
	assert.NoFileExists(t, sock)
	assert.Contains(t, stderr.String(), "model published")
	assert.Contains(t, stderr.String(), "serving evidence")
}

// An invalid serve flag is refused before anything is fetched or measured.
func TestFetchAndDecryptServeBadFlags(t *testing.T) {
	dir := t.TempDir()
	var out, errb bytes.Buffer
	rc := run(context.Background(), []string{"cai-agent", "--tee", "sample", "--state-dir", filepath.Join(dir, "state"),
		"fetch-and-decrypt", "--source", dir, "--out", filepath.Join(dir, "out"), "--kbc", "offline",
		"--key-file", filepath.Join(dir, "none.key"), "--serve", "--socket", "", "--listen", ""}, strings.NewReader(""), &out, &errb)
	assert.Equal(t, ExitUsage, rc, "%s", errb.String())
	assert.Contains(t, errb.String(), "--socket")
	assert.NoDirExists(t, filepath.Join(dir, "out"))
}
