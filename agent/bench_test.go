package agent

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cai-agent/cai-agent/agent/store"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// Benchmarks of the whole flow against decryption alone (store.Unpack) for the same
// multi-shard model: CAI_BENCH_AGENT_SIZE bytes (default 1 GiB; e.g. 256MiB for a quick run)
// in 2 files, 256 MiB shards, 1 MiB chunks, decrypted into tmpfs (/dev/shm). The model is
// encrypted once per process into TMPDIR. peak-rss-MB is the process's high-water mark.

var benchModel struct {
	once sync.Once
	dir  string
	key  []byte
	size int64
	err  error
}

func benchSize() int64 {
	s := os.Getenv("CAI_BENCH_AGENT_SIZE")
	if s == "" {
		return 1 << 30
	}
	mult := int64(1)
	for suf, m := range map[string]int64{"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30} {
		if strings.HasSuffix(s, suf) {
			s, mult = strings.TrimSuffix(s, suf), m
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		panic("CAI_BENCH_AGENT_SIZE: want N, NMiB or NGiB")
	}
	return n * mult
}

func setupBenchModel(b *testing.B) (dir string, key []byte, size int64) {
	benchModel.once.Do(func() {
		size := benchSize()
		tmp, err := os.MkdirTemp("", "cai-agent-bench-")
		if err != nil {
			benchModel.err = err
			return
		}
		key := make([]byte, 32)
		// Pseudo-random plaintext (AES-CTR keystream): fast, incompressible.
		blk, _ := aes.NewCipher(key)
		ctr := cipher.NewCTR(blk, make([]byte, 16))
		var files []modelcrypt.InputFile
		for i, n := range []int64{size - size/8, size / 8} {
			p := filepath.Join(tmp, "plain"+strconv.Itoa(i))
			f, err := os.Create(p)
			if err != nil {
				benchModel.err = err
				return
			}
			_, err = io.CopyN(f, cipher.StreamReader{S: ctr, R: zeroReader{}}, n)
			f.Close()
			if err != nil {
				benchModel.err = err
				return
			}
			files = append(files, modelcrypt.InputFile{Name: "part" + strconv.Itoa(i) + ".bin", Path: p})
		}
		key[0] = 7
		_, benchModel.err = modelcrypt.Encrypt(context.Background(), key, files, filepath.Join(tmp, "enc"),
			modelcrypt.EncryptOptions{ShardSize: 256 << 20, KeyHint: testResource})
		for _, f := range files {
			os.Remove(f.Path)
		}
		benchModel.dir, benchModel.key, benchModel.size = filepath.Join(tmp, "enc"), key, size
	})
	if benchModel.err != nil {
		b.Fatal(benchModel.err)
	}
	if store.CheckTmpfs("/dev/shm") != nil {
		b.Skip("no tmpfs at /dev/shm")
	}
	return benchModel.dir, benchModel.key, benchModel.size
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func benchOut(b *testing.B) string {
	d, err := os.MkdirTemp("/dev/shm", "cai-agent-bench-out-")
	if err != nil {
		b.Fatal(err)
	}
	return d
}

func reportPeakRSS(b *testing.B) {
	s, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return
	}
	for _, l := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			b.ReportMetric(kb/1024, "peak-rss-MB")
		}
	}
}

func BenchmarkDecryptOnly(b *testing.B) {
	dir, key, size := setupBenchModel(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		out := benchOut(b)
		b.StartTimer()
		m, err := modelcrypt.Open(context.Background(), modelcrypt.DirSource(dir))
		if err != nil {
			b.Fatal(err)
		}
		if err := m.Unlock(key); err != nil {
			b.Fatal(err)
		}
		if _, err := store.Unpack(context.Background(), m, modelcrypt.DirSource(dir), out, store.Options{}); err != nil {
			b.Fatal(err)
		}
		m.Lock()
		b.StopTimer()
		os.RemoveAll(out)
		b.StartTimer()
	}
	reportPeakRSS(b)
}

func benchRun(b *testing.B, src func(dir string) modelcrypt.Source) {
	dir, key, size := setupBenchModel(b)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		out := benchOut(b)
		b.StartTimer()
		if _, err := Run(context.Background(), Config{Source: src(dir), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		os.RemoveAll(out)
		b.StartTimer()
	}
	reportPeakRSS(b)
}

func BenchmarkFetchAndDecryptDir(b *testing.B) {
	benchRun(b, modelcrypt.DirSource)
}

func BenchmarkFetchAndDecryptHTTP(b *testing.B) {
	var srv *httptest.Server
	defer func() {
		if srv != nil {
			srv.Close()
		}
	}()
	benchRun(b, func(dir string) modelcrypt.Source {
		if srv == nil {
			srv = httptest.NewServer(http.FileServer(http.Dir(dir)))
		}
		s, err := NewHTTPSource(srv.URL, HTTPOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return s
	})
}
