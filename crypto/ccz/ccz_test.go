package ccz

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "regenerate testdata/ccz fixtures")

// fixtureDir is the repository's testdata/ccz.
const fixtureDir = "../../testdata/ccz"

// fixtureKey is the fixed key of the fixtures (also in testdata/ccz/key.b64).
func fixtureKey() []byte {
	k := sha256.Sum256([]byte("cai-agent ccz fixture key"))
	return k[:]
}

// fixedIV is a deterministic IV per name: fixtures only; real messages use crypto/rand.
type fixedIV string

func (f fixedIV) Read(p []byte) (int, error) {
	s := sha256.Sum256([]byte("iv:" + string(f)))
	return copy(p, s[:]), nil
}

var fixturePlain = map[string][]byte{
	"config.json":       []byte("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64}\n"),
	"tokenizer.json":    []byte("{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n"),
	"model.safetensors": bytes.Repeat([]byte("cai-agent ccz fixture weights\x00\x01\x02"), 1000),
	"empty.txt":         {},
}

// fixtures returns every fixture file's path (relative to testdata/ccz) and content.
func fixtures(t *testing.T) map[string][]byte {
	t.Helper()
	key := fixtureKey()
	out := map[string][]byte{
		"key.b64": []byte(base64.StdEncoding.EncodeToString(key) + "\n"),
	}
	seal := func(name string, pt []byte) []byte {
		m, err := Seal(key, pt, fixedIV(name))
		require.NoError(t, err)
		return m
	}
	// A single file, as `crypto.py -i config.json -o config.json.aes` writes it.
	out["single/config.json.aes"] = seal("single/config.json", fixturePlain["config.json"])
	// A directory, as crypto.py writes it, with the operator's KBS fields filled in and the
	// builder's absolute paths in os.listdir (unsorted) order.
	cfg := Config{
		KBS:    KBSIntelTrustAuthority,
		KBSURL: "https://kbs.example.com:9443/kbs/v1/keys/3f2a6c1e-7b1d-4c55-9d0a-2f3e4b5c6d7e/transfer",
		KeyID:  "3f2a6c1e-7b1d-4c55-9d0a-2f3e4b5c6d7e",
	}
	for _, n := range []string{"tokenizer.json", "model.safetensors", "config.json", "empty.txt"} {
		cfg.Files = append(cfg.Files, "/home/builder/enc/"+n+".aes")
		out["dir/"+n+".aes"] = seal("dir/"+n, fixturePlain[n])
	}
	b, err := json.Marshal(cfg)
	require.NoError(t, err)
	out["dir/"+ConfigName] = b
	for n, pt := range fixturePlain {
		out["plain/"+n] = pt
	}
	// Bad inputs (single files).
	good := seal("bad", fixturePlain["config.json"])
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	out["bad/tampered.json.aes"] = mut(func(b []byte) []byte { b[30] ^= 1; return b })
	out["bad/tag.json.aes"] = mut(func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b })
	out["bad/truncated.json.aes"] = good[:len(good)-1]
	out["bad/trailing.json.aes"] = append(bytes.Clone(good), 0)
	out["bad/ivlen.json.aes"] = mut(func(b []byte) []byte { b[0] = 16; return b })
	out["bad/taglen.json.aes"] = mut(func(b []byte) []byte { b[4] = 12; return b })
	out["bad/datalen.json.aes"] = mut(func(b []byte) []byte {
		binary.LittleEndian.PutUint32(b[8:], uint32(len(b)-HeaderSize-IVSize-1))
		return b
	})
	out["bad/short.json.aes"] = good[:20]
	return out
}

// TestFixtures regenerates the fixtures deterministically and requires the checked-in files
// to be identical (go test -run TestFixtures -update rewrites them).
func TestFixtures(t *testing.T) {
	want := fixtures(t)
	for name, b := range want {
		p := filepath.Join(fixtureDir, filepath.FromSlash(name))
		if *update {
			require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
			require.NoError(t, os.WriteFile(p, b, 0o644))
			continue
		}
		got, err := os.ReadFile(p)
		require.NoError(t, err, "run go test ./crypto/ccz -run TestFixtures -update")
		assert.Equal(t, b, got, name)
	}
}

func TestOpenFixtures(t *testing.T) {
	key := fixtureKey()
	in, err := Load(filepath.Join(fixtureDir, "dir"), Options{})
	require.NoError(t, err)
	require.True(t, in.Config.ITA())
	assert.Equal(t, "3f2a6c1e-7b1d-4c55-9d0a-2f3e4b5c6d7e", in.Config.KeyID)
	assert.Contains(t, in.Config.KBSURL, "/transfer")
	var names []string
	d, err := NewDecryptor(key, Options{})
	require.NoError(t, err)
	defer d.Close()
	for _, e := range in.Files {
		names = append(names, e.Name)
		pt, err := d.Decrypt(e)
		require.NoError(t, err, e.Name)
		assert.Equal(t, fixturePlain[e.Name], pt, e.Name)
		assert.Equal(t, int64(len(pt)), e.Header.PlaintextSize())
		msg, err := os.ReadFile(e.Path)
		require.NoError(t, err)
		pt2, err := Open(key, msg)
		require.NoError(t, err)
		assert.Equal(t, fixturePlain[e.Name], pt2)
	}
	assert.Equal(t, []string{"config.json", "empty.txt", "model.safetensors", "tokenizer.json"}, names)

	single, err := Load(filepath.Join(fixtureDir, "single", "config.json.aes"), Options{})
	require.NoError(t, err)
	require.Nil(t, single.Config)
	require.Len(t, single.Files, 1)
	assert.Equal(t, "config.json", single.Files[0].Name)
	pt, err := d.Decrypt(single.Files[0])
	require.NoError(t, err)
	assert.Equal(t, fixturePlain["config.json"], pt)
}

func TestBadFixtures(t *testing.T) {
	key := fixtureKey()
	cases := map[string]error{
		"tampered":  ErrAuth,
		"tag":       ErrAuth,
		"truncated": ErrFormat,
		"trailing":  ErrFormat,
		"ivlen":     ErrFormat,
		"taglen":    ErrFormat,
		"datalen":   ErrFormat,
		"short":     ErrFormat,
	}
	d, err := NewDecryptor(key, Options{})
	require.NoError(t, err)
	defer d.Close()
	for name, want := range cases {
		p := filepath.Join(fixtureDir, "bad", name+".json.aes")
		msg, err := os.ReadFile(p)
		require.NoError(t, err)
		_, err = Open(key, msg)
		require.ErrorIs(t, err, want, name)
		in, lerr := Load(p, Options{})
		if want == ErrFormat {
			require.ErrorIs(t, lerr, ErrFormat, name)
			continue
		}
		require.NoError(t, lerr, name)
		_, err = d.Decrypt(in.Files[0])
		require.ErrorIs(t, err, ErrAuth, name)
		assert.Equal(t, make([]byte, cap(d.buf)), d.buf[:cap(d.buf)], "buffer wiped after failure")
	}
}

func TestWrongKey(t *testing.T) {
	msg, err := os.ReadFile(filepath.Join(fixtureDir, "single", "config.json.aes"))
	require.NoError(t, err)
	k := fixtureKey()
	k[0] ^= 1
	_, err = Open(k, msg)
	require.ErrorIs(t, err, ErrAuth)
	assert.NotContains(t, err.Error(), base64.StdEncoding.EncodeToString(k))
	_, err = Open(k[:16], msg)
	require.Error(t, err)
}

func TestSealOpenRoundTrip(t *testing.T) {
	key := make([]byte, KeySize)
	_, _ = rand.Read(key)
	for _, n := range []int{0, 1, 15, 16, 17, 4096, 100000} {
		pt := bytes.Repeat([]byte{byte(n)}, n)
		m, err := Seal(key, pt, rand.Reader)
		require.NoError(t, err)
		require.Len(t, m, n+Overhead)
		assert.Equal(t, uint32(IVSize), binary.LittleEndian.Uint32(m[0:]))
		assert.Equal(t, uint32(TagSize), binary.LittleEndian.Uint32(m[4:]))
		assert.Equal(t, uint32(n+TagSize), binary.LittleEndian.Uint32(m[8:]))
		got, err := Open(key, m)
		require.NoError(t, err)
		assert.Equal(t, pt, got)
		// In place.
		got, err = OpenTo(m[HeaderSize+IVSize:], key, m, 0)
		require.NoError(t, err)
		assert.Equal(t, pt, got)
	}
}

func TestMaxDataLen(t *testing.T) {
	key := fixtureKey()
	m, err := Seal(key, make([]byte, 100), rand.Reader)
	require.NoError(t, err)
	_, err = OpenTo(nil, key, m, 115)
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Contains(t, err.Error(), "in memory")
	_, err = OpenTo(nil, key, m, 116)
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "x.aes"), m, 0o644))
	_, err = Load(dir, Options{MaxDataLen: 50})
	require.ErrorIs(t, err, ErrTooLarge)
}

func TestLoadDirRules(t *testing.T) {
	key := fixtureKey()
	m, err := Seal(key, []byte("hello"), rand.Reader)
	require.NoError(t, err)
	mk := func(cfg string, files ...string) string {
		dir := t.TempDir()
		for _, f := range files {
			require.NoError(t, os.WriteFile(filepath.Join(dir, f), m, 0o644))
		}
		if cfg != "" {
			require.NoError(t, os.WriteFile(filepath.Join(dir, ConfigName), []byte(cfg), 0o644))
		}
		return dir
	}
	// No config: every top-level *.aes file; other files ignored.
	dir := mk("", "a.aes", "b.aes", "README.md")
	in, err := Load(dir, Options{})
	require.NoError(t, err)
	require.Len(t, in.Files, 2)
	assert.True(t, Detect(dir))
	assert.False(t, Detect(t.TempDir()))

	bad := map[string]string{
		"missing listed":  `{"kbs":"","kbs_url":"","key_id":"","files":["a.aes","b.aes"]}`,
		"duplicate":       `{"kbs":"","kbs_url":"","key_id":"","files":["a.aes","x/a.aes"]}`,
		"no suffix":       `{"kbs":"","kbs_url":"","key_id":"","files":["a"]}`,
		"no files":        `{"kbs":"","kbs_url":"","key_id":""}`,
		"empty files":     `{"kbs":"","kbs_url":"","key_id":"","files":[]}`,
		"not json":        `{"kbs":`,
		"trailing json":   `{"files":["a.aes"]} {}`,
		"bad output name": `{"files":[".aes"]}`,
	}
	for name, cfg := range bad {
		files := []string{"a.aes"}
		if name == "bad output name" {
			files = append(files, ".aes")
		}
		_, err := Load(mk(cfg, files...), Options{})
		require.ErrorIs(t, err, ErrFormat, name)
	}
	// Unlisted .aes file next to a config.
	_, err = Load(mk(`{"files":["a.aes"]}`, "a.aes", "b.aes"), Options{})
	require.ErrorIs(t, err, ErrFormat)
	// Windows-style builder path and order do not matter.
	in, err = Load(mk(`{"files":["C:\\out\\b.aes","/x/a.aes"]}`, "a.aes", "b.aes"), Options{})
	require.NoError(t, err)
	assert.Equal(t, "a", in.Files[0].Name)
	assert.Equal(t, "b", in.Files[1].Name)
	// Symlinks are refused.
	dir = mk(`{"files":["a.aes"]}`, "b.aes")
	require.NoError(t, os.Remove(filepath.Join(dir, "b.aes")))
	require.NoError(t, os.Symlink(filepath.Join(mk("", "z.aes"), "z.aes"), filepath.Join(dir, "a.aes")))
	_, err = Load(dir, Options{})
	require.ErrorIs(t, err, ErrFormat)
	// A file changed between Load and Decrypt is caught.
	dir = mk("", "a.aes")
	in, err = Load(dir, Options{})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.aes"), append(bytes.Clone(m), 1), 0o644))
	d, err := NewDecryptor(key, Options{})
	require.NoError(t, err)
	_, err = d.Decrypt(in.Files[0])
	require.ErrorIs(t, err, ErrFormat)
}

// TestPythonPeer cross-checks the layout against the peer's own library: Python cryptography's
// AESGCM, used exactly as crypto.py uses it (encode: header, iv, ct||tag; decode: slices).
func TestPythonPeer(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	if exec.Command(py, "-c", "import cryptography.hazmat.primitives.ciphers.aead").Run() != nil {
		t.Skip("python3 cryptography not installed")
	}
	dir := t.TempDir()
	key := fixtureKey()
	script := `
import base64, struct, sys, secrets
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = base64.b64decode(sys.argv[1])
mode, src, dst = sys.argv[2], sys.argv[3], sys.argv[4]
data = open(src, "rb").read()
if mode == "enc":
    iv = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(iv, data, None)
    open(dst, "wb").write(struct.pack("<I", 12) + struct.pack("<I", 16) + struct.pack("<I", len(ct)) + iv + ct)
else:
    iv_len = struct.unpack("<I", data[0:4])[0]
    tag_len = struct.unpack("<I", data[4:8])[0]
    iv = data[12:12+iv_len]
    ct = data[12+iv_len:-tag_len]
    tag = data[-tag_len:]
    open(dst, "wb").write(AESGCM(key).decrypt(iv, ct + tag, None))
`
	k64 := base64.StdEncoding.EncodeToString(key)
	pt := fixturePlain["model.safetensors"]
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pt"), pt, 0o600))
	run := func(args ...string) {
		out, err := exec.Command(py, append([]string{"-c", script, k64}, args...)...).CombinedOutput()
		require.NoError(t, err, strings.TrimSpace(string(out)))
	}
	run("enc", filepath.Join(dir, "pt"), filepath.Join(dir, "py.aes"))
	msg, err := os.ReadFile(filepath.Join(dir, "py.aes"))
	require.NoError(t, err)
	got, err := Open(key, msg)
	require.NoError(t, err)
	assert.Equal(t, pt, got)
	// And the peer decrypts ours.
	run("dec", filepath.Join(fixtureDir, "dir", "model.safetensors.aes"), filepath.Join(dir, "out"))
	got, err = os.ReadFile(filepath.Join(dir, "out"))
	require.NoError(t, err)
	assert.Equal(t, pt, got)
}

func FuzzOpen(f *testing.F) {
	key := fixtureKey()
	for _, name := range []string{"single/config.json.aes", "bad/datalen.json.aes", "bad/short.json.aes"} {
		if b, err := os.ReadFile(filepath.Join(fixtureDir, filepath.FromSlash(name))); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, msg []byte) {
		pt, err := Open(key, msg)
		if err != nil {
			if pt != nil {
				t.Fatal("plaintext returned with an error")
			}
			return
		}
		// Success implies the exact layout.
		if len(msg) != len(pt)+Overhead || binary.LittleEndian.Uint32(msg[8:]) != uint32(len(pt)+TagSize) {
			t.Fatalf("accepted a message with inconsistent lengths")
		}
		again, err := Seal(key, pt, bytes.NewReader(msg[HeaderSize:HeaderSize+IVSize]))
		if err != nil || !bytes.Equal(again, msg) {
			t.Fatalf("re-sealing does not reproduce the message")
		}
	})
}

func FuzzParseHeader(f *testing.F) {
	f.Add(make([]byte, 24), int64(0))
	f.Fuzz(func(t *testing.T, b []byte, max int64) {
		h, err := ParseHeader(b, max)
		if err != nil {
			return
		}
		if h.DataLen < TagSize || h.PlaintextSize() < 0 {
			t.Fatal("accepted data_len shorter than the tag")
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join(fixtureDir, "dir", ConfigName)); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"files":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		if c.Files == nil {
			t.Fatal("accepted a config without files")
		}
		for _, n := range c.Files {
			_ = baseName(n)
		}
	})
}
