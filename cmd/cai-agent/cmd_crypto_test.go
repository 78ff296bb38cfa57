package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/txtar"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestDecryptVectors runs `cai-agent decrypt` (in process) on every format test vector in
// testdata/vectors and checks the documented exit code of each outcome class: ok 0,
// wrong-key 3, corrupt 4, unsupported-version and not-model 5. On failure OUT must hold no
// published file; on success every file of the manifest must be there.
func TestDecryptVectors(t *testing.T) {
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		t.Skip("/dev/shm missing")
	}
	want := map[string]int{"ok": ExitOK, "wrong-key": ExitWrongKey, "corrupt": ExitCorrupt,
		"unsupported-version": ExitUnsupported, "not-model": ExitUnsupported}
	names, err := filepath.Glob("../../testdata/vectors/*.txtar")
	require.NoError(t, err)
	require.NotEmpty(t, names)
	shm, err := os.MkdirTemp("/dev/shm", "cai-agent-vectors-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(shm) })
	for _, name := range names {
		t.Run(strings.TrimSuffix(filepath.Base(name), ".txtar"), func(t *testing.T) {
			ar, err := txtar.ParseFile(name)
			require.NoError(t, err)
			fields := map[string]string{}
			for _, line := range strings.Split(string(ar.Comment), "\n") {
				if k, v, ok := strings.Cut(line, ": "); ok {
					fields[k] = v
				}
			}
			code, ok := want[fields["expect"]]
			require.True(t, ok, "unknown expect %q", fields["expect"])
			// This format vector carries a placeholder Ollama manifest ({"schemaVersion":2}, no
			// layers): valid for the format, but the publisher refuses to publish an Ollama
			// manifest that is not a real one.
			storeRefuses := filepath.Base(name) == "ok-nested-ollama.txtar"
			if storeRefuses {
				code = ExitFailure
			}
			dir := t.TempDir()
			enc := filepath.Join(dir, "enc")
			require.NoError(t, os.Mkdir(enc, 0o755))
			for _, f := range ar.Files {
				b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(f.Data)), ""))
				require.NoError(t, err, f.Name)
				require.NoError(t, os.WriteFile(filepath.Join(enc, f.Name), b, 0o644))
			}
			key, err := hex.DecodeString(fields["key"])
			require.NoError(t, err)
			keyFile := filepath.Join(dir, "key")
			require.NoError(t, os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600))
			out := filepath.Join(shm, filepath.Base(name))
			args := []string{"cai-agent", "decrypt", "--key-file", keyFile, "--in", enc, "--out", out}
			if fields["verify-digests"] == "true" {
				args = append(args, "--verify-digests")
			}
			var stdout, stderr bytes.Buffer
			got := run(context.Background(), args, nil, &stdout, &stderr)
			require.Equal(t, code, got, "stderr: %s", stderr.String())
			if storeRefuses {
				assert.Contains(t, stderr.String(), "invalid manifest: no layers")
			}
			assert.NotContains(t, stderr.String(), base64.StdEncoding.EncodeToString(key), "key in output")
			assert.NotContains(t, stderr.String(), fields["key"], "key in output")

			var published []string
			_ = filepath.WalkDir(out, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() && d.Name() == ".cai-agent" {
					return filepath.SkipDir
				}
				if err == nil && !d.IsDir() {
					published = append(published, p)
				}
				return nil
			})
			if code != ExitOK {
				assert.Empty(t, published, "nothing published on failure")
				return
			}
			assert.NotEmpty(t, published)
			// inspect agrees with what was published.
			stdout.Reset()
			require.Equal(t, ExitOK, run(context.Background(), []string{"cai-agent", "inspect", "--in", enc, "--json"}, nil, &stdout, &stderr))
			for _, p := range published {
				rel, _ := filepath.Rel(out, p)
				assert.Contains(t, stdout.String(), `"path": "`+filepath.ToSlash(rel)+`"`)
			}
		})
	}
}

// A key hint over the format's limit is a usage error (2) and writes nothing.
func TestEncryptKeyHintTooLong(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600))
	code, _, stderr := runCLI(t, "keygen", "--out", filepath.Join(dir, "k"))
	require.Equal(t, ExitOK, code, stderr)
	code, stdout, stderr := runCLI(t, "encrypt", "--key-file", filepath.Join(dir, "k"), "--in", filepath.Join(dir, "f"),
		"--out", filepath.Join(dir, "enc"), "--key-hint", "kbs:///"+strings.Repeat("a", 3000))
	require.Equal(t, ExitUsage, code, stderr)
	require.Contains(t, stderr, "key hint must be printable UTF-8 of at most 2048 bytes")
	require.Empty(t, stdout)
	require.NoDirExists(t, filepath.Join(dir, "enc"))
}
