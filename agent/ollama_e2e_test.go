package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/agent/store"
	"github.com/cai-agent/cai-agent/agent/tinyllama"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

// ollamaBin returns $CAI_OLLAMA_BIN, skipping the test when it is unset or missing unless
// CAI_REQUIRE_OLLAMA=1 (CI), where that is a failure.
func ollamaBin(t *testing.T) string {
	bin := os.Getenv("CAI_OLLAMA_BIN")
	if bin != "" {
		if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return bin
		}
	}
	msg := fmt.Sprintf("no ollama binary (CAI_OLLAMA_BIN=%q; build it with `make ollama`)", bin)
	if os.Getenv("CAI_REQUIRE_OLLAMA") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// tmpfsDir returns a fresh directory on tmpfs (/dev/shm), removed at the end of the test,
// or a temporary directory with allowNonTmpfs=true when there is no tmpfs.
func tmpfsDir(t *testing.T) (dir string, allowNonTmpfs bool) {
	if store.CheckTmpfs("/dev/shm") == nil {
		d, err := os.MkdirTemp("/dev/shm", "cai-agent-test-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d, false
		}
	}
	t.Log("no writable tmpfs at /dev/shm: using a disk directory with AllowNonTmpfs")
	return t.TempDir(), true
}

// TestOllamaEndToEnd runs the whole mission against the real Ollama (v0.5.7 in CI): the tiny
// model, written as an Ollama store, encrypted; the sample TEE and a Trustee test server;
// Run into tmpfs; then `ollama serve` on loopback with OLLAMA_MODELS = the decrypted store
// generates 5 tokens. Everything started is stopped by process group.
func TestOllamaEndToEnd(t *testing.T) {
	bin := ollamaBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Model owner: tiny model → Ollama store → encrypted Ollama model; key into the KBS.
	gguf, err := tinyllama.Bytes()
	require.NoError(t, err)
	plainStore := t.TempDir()
	id, err := ollama.WriteModel(plainStore, "cai-tiny", []ollama.Layer{
		{MediaType: ollama.MediaTypeModel, Data: gguf},
		{MediaType: ollama.MediaTypeTemplate, Data: []byte(tinyllama.Template)},
		{MediaType: ollama.MediaTypeParams, Data: []byte(tinyllama.Params)},
	})
	require.NoError(t, err)
	files, err := ollama.ModelFiles(plainStore, "cai-tiny")
	require.NoError(t, err)
	key := bytes.Repeat([]byte{0x42}, 32)
	enc := filepath.Join(t.TempDir(), "enc")
	_, err = modelcrypt.Encrypt(ctx, key, files, enc, modelcrypt.EncryptOptions{
		ChunkSize: 64 << 10, ShardSize: 128 << 10, KeyHint: testResource,
		Kind: modelcrypt.KindOllama, OllamaModel: "registry.ollama.ai/library/cai-tiny:latest",
	})
	require.NoError(t, err)
	kbs := kbstest.NewTrustee()
	require.NoError(t, kbs.SetResource(testResource, key))
	kbsSrv := httptest.NewServer(kbs)
	defer kbsSrv.Close()
	// The encrypted model is served over HTTP too.
	objSrv := httptest.NewServer(&objectServer{dir: enc, cutAfter: 50000, cuts: 1})
	defer objSrv.Close()

	// In the TEE: the sample TEE, the Trustee client, Run into tmpfs.
	p, err := evidence.Open(ctx, evidence.Options{TEE: evidence.TEESample, StateDir: t.TempDir()})
	require.NoError(t, err)
	defer p.Close()
	broker, err := trustee.New(trustee.Options{URL: kbsSrv.URL, Attester: p, HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
	require.NoError(t, err)
	shm, allow := tmpfsDir(t)
	models := filepath.Join(shm, "models")
	res, err := Run(ctx, Config{
		Source: httpSource(t, objSrv.URL+"/m", HTTPOptions{}), Out: models, Evidence: p, Broker: broker,
		MeasureBinaries: []string{bin}, AllowNonTmpfs: allow,
	})
	require.NoError(t, err)
	require.Equal(t, id, res.ManifestSHA256)
	require.Len(t, res.Measurements, 2)

	// The event log replays to the RTMR3 reported.
	log, err := p.EventLog()
	require.NoError(t, err)
	events, err := eventlog.Parse(log)
	require.NoError(t, err)
	rtmrs, err := eventlog.Replay(events)
	require.NoError(t, err)
	require.Equal(t, res.RTMR3, fmt.Sprintf("%x", rtmrs[3]))

	// Ollama on loopback against the decrypted store.
	port := freePort(t)
	cmd := exec.Command(bin, "serve")
	cmd.Env = append(os.Environ(),
		"HOME="+t.TempDir(),
		"OLLAMA_HOST=127.0.0.1:"+strconv.Itoa(port),
		"OLLAMA_MODELS="+models,
		"OLLAMA_NOPRUNE=1",
	)
	var logBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	pgid := cmd.Process.Pid
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		syscall.Kill(-pgid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-pgid, syscall.SIGKILL)
			<-done
		}
		// Runners are in the same process group; give them a moment, then force.
		deadline := time.Now().Add(5 * time.Second)
		for len(processGroup(pgid)) > 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		syscall.Kill(-pgid, syscall.SIGKILL)
	}
	defer stop()
	defer func() {
		if t.Failed() {
			t.Logf("ollama log:\n%s", logBuf.String())
		}
	}()

	base := "http://127.0.0.1:" + strconv.Itoa(port)
	require.Eventually(t, func() bool {
		r, err := http.Get(base + "/api/version")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	}, 30*time.Second, 50*time.Millisecond)

	var tags struct {
		Models []struct{ Name, Digest string }
	}
	getJSON(t, base+"/api/tags", nil, &tags)
	require.Len(t, tags.Models, 1)
	require.Equal(t, "cai-tiny:latest", tags.Models[0].Name)
	require.Equal(t, res.ManifestSHA256, tags.Models[0].Digest)

	var gen struct {
		Done      bool   `json:"done"`
		Response  string `json:"response"`
		EvalCount int    `json:"eval_count"`
	}
	getJSON(t, base+"/api/generate", map[string]any{
		"model": "cai-tiny", "prompt": "hello world", "stream": false,
		"options": map[string]any{"num_predict": 5, "num_thread": 1, "temperature": 0},
	}, &gen)
	require.True(t, gen.Done)
	require.Equal(t, 5, gen.EvalCount)
	require.NotEmpty(t, gen.Response)

	stop()
	require.Empty(t, processGroup(pgid), "ollama processes left running")
}

func getJSON(t *testing.T, url string, body any, v any) {
	t.Helper()
	var resp *http.Response
	var err error
	if body == nil {
		resp, err = http.Get(url)
	} else {
		b, _ := json.Marshal(body)
		c := &http.Client{Timeout: 2 * time.Minute}
		resp, err = c.Post(url, "application/json", bytes.NewReader(b))
	}
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(v))
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// processGroup lists the live (non-zombie) processes of process group pgid.
func processGroup(pgid int) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 3 || f[0] == "Z" {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid {
			pids = append(pids, pid)
		}
	}
	return pids
}
