package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const (
	testAPIKey   = "djE6Y2FpLWFnZW50LXBhc3Nwb3J0LXRlc3Qta2V5LTAxMjM0NTY3ODk"
	itaPolicy    = "1f1f13e0-9fb1-4a57-ba42-361d86157fa3"
	itaNoPolicy  = "2f1f13e0-9fb1-4a57-ba42-361d86157fa3"
	passportHint = "passport mode"
)

// writeKeyFile writes key (with a trailing newline, as editors leave it) to a 0600 file.
func writeKeyFile(t *testing.T, key string) string {
	f := filepath.Join(t.TempDir(), "ita-api-key")
	require.NoError(t, os.WriteFile(f, []byte(key+"\n"), 0o600))
	return f
}

// ITA passport mode end to end on (fake) TDX: dev-kbs --kbc ita --ita-appraisal plays Intel
// Trust Authority's appraisal API v1 and the KBS on one listener; get-resource gets a nonce and
// a token there (API key from a file, or from CAI_ITA_API_KEY) and the key from the KBS. A
// wrong API key and an unknown policy are refused (exit 11); the API key is never printed or
// logged.
func TestGetResourceITAPassportOnTDX(t *testing.T) {
	fakeTDX(t)
	t.Setenv(itaAPIKeyEnv, "")
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	require.NoError(t, os.WriteFile(secret, []byte("s3cr3t-ita-passport-key"), 0o600))
	keyFile := writeKeyFile(t, testAPIKey)
	addr, stop := devKBS(t, "--kbc", "ita", "--ita-appraisal", "--ita-api-key-file", keyFile, "--ita-policy-id", itaPolicy,
		"--resource", itaKeyID+"=@"+secret)

	get := func(out string, extra ...string) (int, string) {
		code, stdout, stderr := runCLI(t, append([]string{"--tee", "tdx", "--log-level", "debug", "get-resource", "--kbc", "ita",
			"--kbs-url", "http://" + addr, "--ita-appraisal-url", "http://" + addr, "--insecure-http", "--retries", "0",
			"--resource", itaKeyID, "--out", out}, extra...)...)
		require.Empty(t, stdout)
		require.NotContains(t, stderr, "s3cr3t")
		require.NotContains(t, stderr, testAPIKey)
		return code, stderr
	}
	code, stderr := get(filepath.Join(dir, "key"), "--ita-api-key-file", keyFile, "--ita-policy-id", strings.ToUpper(itaPolicy), "--ita-policy-must-match")
	require.Equal(t, ExitOK, code, stderr)
	require.Contains(t, stderr, "attestation token issued")
	got, err := os.ReadFile(filepath.Join(dir, "key"))
	require.NoError(t, err)
	require.Equal(t, "s3cr3t-ita-passport-key", string(got))

	wrongKey := "wrong-" + testAPIKey
	code, stderr = get(filepath.Join(dir, "wrong-key"), "--ita-api-key-file", writeKeyFile(t, wrongKey))
	require.Equal(t, ExitKBS, code, stderr)
	require.Contains(t, stderr, "GET /appraisal/v1/nonce: HTTP 401 Unauthorized")
	require.NotContains(t, stderr, wrongKey)
	require.NoFileExists(t, filepath.Join(dir, "wrong-key"))

	code, stderr = get(filepath.Join(dir, "no-policy"), "--ita-api-key-file", keyFile, "--ita-policy-id", itaNoPolicy)
	require.Equal(t, ExitKBS, code, stderr)
	require.Contains(t, stderr, "POST /appraisal/v1/attest: HTTP 400 Bad Request: policy id "+itaNoPolicy+" not found")

	// The key from the environment instead of a file.
	t.Setenv(itaAPIKeyEnv, testAPIKey)
	code, stderr = get(filepath.Join(dir, "key-from-env"))
	require.Equal(t, ExitOK, code, stderr)
	got, err = os.ReadFile(filepath.Join(dir, "key-from-env"))
	require.NoError(t, err)
	require.Equal(t, "s3cr3t-ita-passport-key", string(got))

	log := stop()
	require.Contains(t, log, "Intel Trust Authority KBS v1 key transfer, and Intel Trust Authority appraisal API v1")
	require.Contains(t, log, "--ita-appraisal-url http://"+addr+" --ita-api-key-file FILE --kbs-url http://"+addr)
	require.Contains(t, log, "path=/appraisal/v1/nonce status=401")
	require.Contains(t, log, "path=/appraisal/v1/nonce status=200")
	require.Contains(t, log, "path=/appraisal/v1/attest status=200")
	require.Contains(t, log, "path=/appraisal/v1/attest status=400")
	require.Contains(t, log, "path=/kbs/v1/keys/"+itaKeyID+"/transfer status=200")
	require.NotContains(t, log, "s3cr3t")
	require.NotContains(t, log, testAPIKey)
}

// fetch-and-decrypt in passport mode, configured only through the environment as the init
// container and the systemd unit do (CAI_KBC, CAI_KBS_URL, CAI_ITA_APPRAISAL_URL,
// CAI_ITA_API_KEY_FILE, CAI_ITA_POLICY_ID): binaries measured before the key request, the
// model after it, the token obtained from the appraisal API.
func TestFetchAndDecryptITAPassportOnTDX(t *testing.T) {
	k := fakeTDX(t)
	t.Setenv(itaAPIKeyEnv, "")
	in := tinyEncryptedModel(t, "ita:///keys/"+itaKeyID)
	keyFile := writeKeyFile(t, testAPIKey)
	addr, stop := devKBS(t, "--kbc", "ita", "--ita-appraisal", "--ita-api-key-file", keyFile, "--ita-policy-id", itaPolicy, "--ita-policy-id", itaNoPolicy,
		"--resource", itaKeyID+"=@"+in("model.key"))
	for k, v := range map[string]string{
		"CAI_KBC": "ita", "CAI_KBS_URL": "http://" + addr, "CAI_INSECURE_HTTP": "true",
		"CAI_ITA_APPRAISAL_URL": "http://" + addr, "CAI_ITA_API_KEY_FILE": keyFile,
		"CAI_ITA_POLICY_ID": itaPolicy + "," + itaNoPolicy, "CAI_ITA_POLICY_MUST_MATCH": "true",
	} {
		t.Setenv(k, v)
	}
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"cai-agent", "--tee", "tdx", "--state-dir", in("state"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out"), "--allow-non-tmpfs", "--measure-binary", in("model.key"), "--no-progress", "--json"},
		strings.NewReader(""), &out, &errb)
	require.Equal(t, ExitOK, code, errb.String())
	require.NotContains(t, errb.String(), testAPIKey)
	requireTDXFetch(t, k, in, out.Bytes())
	log := stop()
	require.Contains(t, log, "path=/appraisal/v1/attest status=200")
	require.Contains(t, log, "/transfer status=200")
	require.NotContains(t, log, testAPIKey)

	// Without the API key: a usage error (exit 2) before any key request.
	t.Setenv("CAI_ITA_API_KEY_FILE", "")
	out.Reset()
	errb.Reset()
	code = run(context.Background(), []string{"cai-agent", "--tee", "tdx", "--state-dir", in("state2"), "fetch-and-decrypt",
		"--source", in("enc"), "--out", in("out2"), "--allow-non-tmpfs", "--no-progress"}, strings.NewReader(""), &out, &errb)
	require.Equal(t, ExitUsage, code, errb.String())
	require.Contains(t, errb.String(), "--ita-appraisal-url needs the Trust Authority attestation API key")
	require.Empty(t, out.String())
	require.NoDirExists(t, in("out2/tiny.gguf"))
}

// Command-line mistakes of passport mode are usage errors (exit 2) that never repeat the API
// key, and nothing is requested.
func TestITAPassportUsageErrors(t *testing.T) {
	fakeTDX(t)
	t.Setenv(itaAPIKeyEnv, "")
	keyFile := writeKeyFile(t, testAPIKey)
	spaced := writeKeyFile(t, "two words")
	empty := writeKeyFile(t, "")
	big := filepath.Join(t.TempDir(), "big")
	require.NoError(t, os.WriteFile(big, bytes.Repeat([]byte("k"), 9<<10), 0o600))
	out := filepath.Join(t.TempDir(), "key")
	base := []string{"--tee", "tdx", "get-resource", "--resource", itaKeyID, "--out", out, "--kbs-url", "https://kbs.invalid", "--insecure-http"}
	for _, tc := range []struct {
		name string
		env  string // CAI_ITA_API_KEY
		args []string
		want string
	}{
		{"no key", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid"}, "--ita-appraisal-url needs the Trust Authority attestation API key: --ita-api-key-file FILE or the environment variable CAI_ITA_API_KEY"},
		{"key twice", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", keyFile}, "not both"},
		{"key file without url", "", []string{"--kbc", "ita", "--ita-api-key-file", keyFile}, "--ita-api-key-file is for ITA " + passportHint},
		{"policy without url", "", []string{"--kbc", "ita", "--ita-policy-id", itaPolicy}, "--ita-policy-id is for ITA " + passportHint},
		{"ca file without url", "", []string{"--kbc", "ita", "--ita-ca-file", keyFile}, "--ita-ca-file is for ITA " + passportHint},
		{"trustee", "", []string{"--kbc", "trustee", "--ita-appraisal-url", "https://ita.invalid"}, "--ita-appraisal-url is for --kbc ita"},
		{"offline", "", []string{"--kbc", "offline", "--ita-policy-must-match"}, "--ita-policy-must-match is for --kbc ita"},
		{"with ita-nonce", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-nonce"}, "--ita-nonce is for background-check mode"},
		{"url with query", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid/?key=" + testAPIKey}, "--ita-appraisal-url must be a URL https://host[:port][/prefix] without user info, query or fragment"},
		{"url with user", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://u:" + testAPIKey + "@ita.invalid"}, "without user info"},
		// An explicit empty id (an unset shell variable) is refused, not dropped.
		{"empty policy id", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-policy-id", "", "--ita-policy-must-match"}, "--ita-policy-id: an empty value"},
		{"plain http to a remote host", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "http://ita.invalid"}, "plain http:// only to a loopback address"},
		// The key given where its file goes (or CAI_ITA_API_KEY_FILE=KEY) is not repeated.
		{"key as key file", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", testAPIKey}, "--ita-api-key-file: no such file or directory"},
		{"plain http", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "http://ita.invalid", "--kbs-url", "https://kbs.invalid"}, "plain http"},
		{"missing key file", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", keyFile + ".missing"}, "--ita-api-key-file: no such file or directory"},
		{"key file is a directory", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", filepath.Dir(keyFile)}, "--ita-api-key-file: not a regular file"},
		{"key with a space", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", spaced}, "want one API key of printable ASCII without spaces"},
		{"empty key file", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", empty}, "want one API key"},
		{"huge key file", "", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-api-key-file", big}, "larger than 8192 bytes"},
		{"bad env key", "a\tb", []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid"}, "CAI_ITA_API_KEY: want one API key"},
		{"bad policy id", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal-url", "https://ita.invalid", "--ita-policy-id", testAPIKey}, "policy id #1 is not a UUID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(itaAPIKeyEnv, tc.env)
			args := append(append([]string{}, base...), tc.args...)
			if tc.name == "plain http" {
				args = append([]string{"--tee", "tdx", "get-resource", "--resource", itaKeyID, "--out", out}, tc.args...)
			}
			code, stdout, stderr := runCLI(t, args...)
			require.Equal(t, ExitUsage, code, stderr)
			require.Empty(t, stdout)
			require.Contains(t, stderr, tc.want)
			require.NotContains(t, stderr, testAPIKey)
			require.NoFileExists(t, out)
		})
	}

	// dev-kbs.
	secret := writeKeyFile(t, "k")
	for _, tc := range []struct {
		name string
		env  string
		args []string
		want string
	}{
		{"appraisal without key", "", []string{"--kbc", "ita", "--ita-appraisal"}, "no Trust Authority API key"},
		{"key file without appraisal", "", []string{"--kbc", "ita", "--ita-api-key-file", keyFile}, "--ita-api-key-file is for --ita-appraisal"},
		{"policy without appraisal", "", []string{"--kbc", "ita", "--ita-policy-id", itaPolicy}, "--ita-policy-id is for --ita-appraisal"},
		{"appraisal for trustee", "", []string{"--kbc", "trustee", "--ita-appraisal"}, "--ita-appraisal is for --kbc ita"},
		{"bad policy id", testAPIKey, []string{"--kbc", "ita", "--ita-appraisal", "--ita-policy-id", "p1"}, "--ita-policy-id #1 is not a UUID"},
	} {
		t.Run("dev-kbs "+tc.name, func(t *testing.T) {
			t.Setenv(itaAPIKeyEnv, tc.env)
			resource := itaKeyID + "=@" + secret
			if tc.args[1] == "trustee" {
				resource = "kbs:///a/b/c=@" + secret
			}
			code, stdout, stderr := runCLI(t, append([]string{"dev-kbs", "--listen", "127.0.0.1:0", "--resource", resource}, tc.args...)...)
			require.Equal(t, ExitUsage, code, stderr)
			require.Empty(t, stdout)
			require.Contains(t, stderr, tc.want)
			require.NotContains(t, stderr, testAPIKey)
		})
	}
}
