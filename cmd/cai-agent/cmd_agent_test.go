package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tinyEncryptedModel makes, in a fresh directory, the tiny GGUF (plain/tiny.gguf), a key
// (model.key) and the model encrypted under it with keyHint (enc); it returns a function
// giving the path of a name in that directory.
func tinyEncryptedModel(t *testing.T, keyHint string) func(name string) string {
	t.Helper()
	dir := t.TempDir()
	in := func(name string) string { return filepath.Join(dir, name) }
	require.NoError(t, os.Mkdir(in("plain"), 0o755))
	for _, args := range [][]string{
		{"dev-tiny-model", "--gguf", in("plain/tiny.gguf")},
		{"keygen", "--out", in("model.key")},
		{"encrypt", "--key-file", in("model.key"), "--in", in("plain"), "--out", in("enc"), "--key-hint", keyHint},
	} {
		code, _, stderr := runCLI(t, args...)
		require.Equal(t, ExitOK, code, "%v: %s", args, stderr)
	}
	return in
}

// fetch-and-decrypt from a private http:// source: the token of --source-token-file
// (CAI_SOURCE_TOKEN_FILE) goes with every request and never into the output; without it the
// source refuses (exit 8) and nothing is published.
func TestFetchAndDecryptSourceToken(t *testing.T) {
	in := tinyEncryptedModel(t, "kbs:///default/model-key/tiny")
	const token = "hf_s3cr3tT0ken"
	require.NoError(t, os.WriteFile(in("token"), []byte(token+"\n"), 0o600))
	files := http.FileServer(http.Dir(in("enc")))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, "private", http.StatusUnauthorized)
			return
		}
		files.ServeHTTP(w, r)
	}))
	defer srv.Close()

	fetch := func(extra ...string) (int, string) {
		var out, errb bytes.Buffer
		args := append([]string{"cai-agent", "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
			"--source", srv.URL + "/", "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline",
			"--key-file", in("model.key"), "--no-progress", "--source-retries", "0"}, extra...)
		rc := run(context.Background(), args, strings.NewReader(""), &out, &errb)
		return rc, out.String() + errb.String()
	}
	rc, output := fetch()
	assert.Equal(t, ExitSource, rc, output)
	assert.Contains(t, output, "401")
	assert.NoFileExists(t, in("out/tiny.gguf"))

	t.Setenv("CAI_SOURCE_TOKEN_FILE", in("token"))
	rc, output = fetch()
	require.Equal(t, ExitOK, rc, output)
	assert.NotContains(t, output, token)
	assert.Contains(t, output, "sending the source token over plain http://")
	want, err := os.ReadFile(in("plain/tiny.gguf"))
	require.NoError(t, err)
	got, err := os.ReadFile(in("out/tiny.gguf"))
	require.NoError(t, err)
	assert.Equal(t, want, got)

	// A bad token file is a usage error naming the file, not its content.
	require.NoError(t, os.WriteFile(in("badtoken"), []byte("two\nlines "+token), 0o600))
	rc, output = fetch("--source-token-file", in("badtoken"))
	assert.Equal(t, ExitUsage, rc, output)
	assert.Contains(t, output, "badtoken")
	assert.NotContains(t, output, token)
	// The token given where its file goes is not repeated; a FIFO there does not block.
	rc, output = fetch("--source-token-file", token)
	assert.Equal(t, ExitUsage, rc, output)
	assert.NotContains(t, output, token)
	require.NoError(t, syscall.Mkfifo(in("fifo"), 0o600))
	rc, output = fetch("--source-token-file", in("fifo"))
	assert.Equal(t, ExitUsage, rc, output)
	assert.Contains(t, output, "not a regular file")
	// And a token for a local source is refused.
	var out, errb bytes.Buffer
	rc = run(context.Background(), []string{"cai-agent", "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out2"), "--kbc", "offline", "--key-file", in("model.key")}, strings.NewReader(""), &out, &errb)
	assert.Equal(t, ExitUsage, rc, errb.String())
}

// A fetch-and-decrypt stopped by a signal (its context cancelled) exits 130 whatever step it
// was in, and publishes nothing.
func TestFetchAndDecryptInterrupted(t *testing.T) {
	in := tinyEncryptedModel(t, "")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out, errb bytes.Buffer
	rc := run(ctx, []string{"cai-agent", "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline", "--key-file", in("model.key"),
		"--measure-binary", in("model.key"), "--no-progress"}, strings.NewReader(""), &out, &errb)
	require.Equal(t, ExitInterrupted, rc, errb.String())
	require.Contains(t, errb.String(), "cai-agent: interrupted: ")
	require.Empty(t, out.String())
	require.NoFileExists(t, in("out/tiny.gguf"))
}

// A missing object is the same failure from an http(s) source as from a directory: a missing
// shard is a corrupt (truncated) model, exit 4; a missing model.cai is not a model, exit 5.
// Nothing is published.
func TestFetchAndDecryptMissingObject(t *testing.T) {
	in := tinyEncryptedModel(t, "kbs:///default/model-key/tiny")
	shards, err := filepath.Glob(in("enc/*.shard"))
	require.NoError(t, err)
	require.NotEmpty(t, shards)
	missing := filepath.Base(shards[0])
	files := http.FileServer(http.Dir(in("enc")))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/gone/model.cai" || r.URL.Path == "/m/"+missing {
			http.NotFound(w, r)
			return
		}
		http.StripPrefix("/m", files).ServeHTTP(w, r)
	}))
	defer srv.Close()
	require.NoError(t, os.Mkdir(in("dirsrc"), 0o755))
	require.NoError(t, os.CopyFS(in("dirsrc/m"), os.DirFS(in("enc"))))
	require.NoError(t, os.Remove(in("dirsrc/m/"+missing)))

	for _, c := range []struct{ source, want string }{
		{srv.URL + "/m/", missing},
		{in("dirsrc/m"), missing},
	} {
		code, stdout, stderr := runCLI(t, "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
			"--source", c.source, "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline",
			"--key-file", in("model.key"), "--no-progress", "--source-retries", "0")
		assert.Equal(t, ExitCorrupt, code, "%s: %s%s", c.source, stdout, stderr)
		assert.Contains(t, stderr, c.want)
		assert.NoFileExists(t, in("out/tiny.gguf"))
	}
	code, stdout, stderr := runCLI(t, "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", srv.URL+"/gone/", "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline",
		"--key-file", in("model.key"), "--no-progress", "--source-retries", "0")
	assert.Equal(t, ExitUnsupported, code, "%s%s", stdout, stderr)
	assert.Contains(t, stderr, "404")
	assert.NoFileExists(t, in("out/tiny.gguf"))
}

// An empty list variable (a deployment template's default: urfave/cli parses it as [""]) is
// no list: neither an ITA policy id given with another broker nor a binary to measure.
func TestFetchAndDecryptEmptyListVariables(t *testing.T) {
	in := tinyEncryptedModel(t, "kbs:///default/model-key/tiny")
	t.Setenv(itaAPIKeyEnv, "")
	t.Setenv("CAI_ITA_POLICY_ID", "")
	t.Setenv("CAI_MEASURE_BINARY", "")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"cai-agent", "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline",
		"--key-file", in("model.key"), "--no-progress"}, strings.NewReader(""), &out, &errb)
	require.NotContains(t, errb.String(), "--ita-policy-id is for --kbc ita", "an empty CAI_ITA_POLICY_ID counted as given")
	require.Equal(t, ExitOK, code, errb.String())
}

// An explicit empty list element (--measure-binary "$UNSET", a trailing comma) is a usage
// error, not silently nothing measured.
func TestFetchAndDecryptExplicitEmptyListElement(t *testing.T) {
	in := tinyEncryptedModel(t, "kbs:///default/model-key/tiny")
	for _, bin := range []string{"", in("plain/tiny.gguf") + ","} {
		code, stdout, stderr := runCLI(t, "--tee", "sample", "--state-dir", in("state"), "fetch-and-decrypt",
			"--source", in("enc"), "--out", in("out"), "--allow-non-tmpfs", "--kbc", "offline",
			"--key-file", in("model.key"), "--no-progress", "--measure-binary", bin)
		require.Equal(t, ExitUsage, code, "--measure-binary %q: %s%s", bin, stdout, stderr)
		require.Contains(t, stderr, "--measure-binary: an empty value")
		require.NoFileExists(t, in("out/tiny.gguf"))
	}
}
