package modelcrypt

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Benchmarks run on tmpfs (/dev/shm) and are skipped without it. The model size defaults to
// 1 GiB in 4 files; CAI_BENCH_MIB=64 makes a quick run. Data generation and clean-up are
// outside the timed region; everything is deleted at the end.
//
//	go test -run '^$' -bench . -benchtime 3x ./crypto/modelcrypt/

func benchMiB(b *testing.B) int64 {
	if s := os.Getenv("CAI_BENCH_MIB"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 4 {
			b.Fatalf("CAI_BENCH_MIB=%q: want an integer >= 4", s)
		}
		return n
	}
	return 1024
}

func benchDir(b *testing.B) string {
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		b.Skip("no /dev/shm (tmpfs)")
	}
	d, err := os.MkdirTemp("/dev/shm", "modelcrypt-bench-")
	if err != nil {
		b.Skip("cannot write /dev/shm: ", err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// writePlain writes nFiles files of the given total size (pseudo-random bytes) under dir.
func writePlain(b *testing.B, dir string, total int64, nFiles int) []InputFile {
	var in []InputFile
	buf := make([]byte, 1<<20)
	r := rand.NewChaCha8([32]byte{1})
	for i := range nFiles {
		name := fmt.Sprintf("model/part-%02d.bin", i)
		p := filepath.Join(dir, "plain", filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		left := total / int64(nFiles)
		for left > 0 {
			n := min(left, int64(len(buf)))
			r.Read(buf[:n])
			if _, err := f.Write(buf[:n]); err != nil {
				b.Fatal(err)
			}
			left -= n
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
		in = append(in, InputFile{Name: name, Path: p})
	}
	return in
}

// osSink writes plaintext files under a directory (what a publisher's staging does).
type osSink string

func (s osSink) Create(path string, size int64) (File, error) {
	p := filepath.Join(string(s), filepath.FromSlash(path))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return nil, err
	}
	return os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
}

// resetPeakRSS resets VmHWM (Linux ≥ 4.0) so each benchmark reports its own peak.
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

func reportPeakRSS(b *testing.B) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err == nil {
				b.ReportMetric(float64(kb)/1024, "peakRSS-MiB")
			}
		}
	}
}

var benchChunkSizes = []int{64 << 10, 256 << 10, 1 << 20, 4 << 20}

// benchModes: AEAD only; AEAD only without spreading a lone shard's chunks over the
// workers (for comparison); SHA-256 re-hash on a separate goroutine for the dominant file
// (the default); SHA-256 always inline in the decrypting goroutine (for comparison).
var benchModes = []struct {
	name              string
	verify, pipelined bool
}{
	{"aead", false, true},
	{"aead-serial", false, false},
	{"verify-sha256", true, true},
	{"verify-sha256-inline", true, false},
}

func setPipelined(on bool) (restore func()) {
	old := pipelining
	pipelining = on
	return func() { pipelining = old }
}

func BenchmarkDecrypt(b *testing.B) {
	dir := benchDir(b)
	total := benchMiB(b) << 20
	in := writePlain(b, dir, total, 4)
	key := testKey(9)
	for _, cs := range benchChunkSizes {
		enc := filepath.Join(dir, "enc")
		os.RemoveAll(enc)
		if _, err := Encrypt(context.Background(), key, in, enc, EncryptOptions{ChunkSize: cs}); err != nil {
			b.Fatal(err)
		}
		for _, mode := range benchModes {
			b.Run(fmt.Sprintf("chunk=%dKiB/%s", cs>>10, mode.name), func(b *testing.B) {
				defer setPipelined(mode.pipelined)()
				benchDecryptOnce(b, enc, filepath.Join(dir, "out"), key, total, DecryptOptions{VerifyDigests: mode.verify})
			})
		}
		os.RemoveAll(enc)
	}
}

// BenchmarkDecryptOneFile is the single-big-file case (one GGUF): one shard (the default
// 2 GiB shard size) and two shards.
func BenchmarkDecryptOneFile(b *testing.B) {
	dir := benchDir(b)
	total := benchMiB(b) << 20
	in := writePlain(b, dir, total, 1)
	key := testKey(9)
	for _, shards := range []int64{1, 2} {
		enc := filepath.Join(dir, "enc")
		os.RemoveAll(enc)
		shardSize := int64(0)
		if shards > 1 {
			shardSize = total / shards
		}
		if _, err := Encrypt(context.Background(), key, in, enc, EncryptOptions{ShardSize: shardSize}); err != nil {
			b.Fatal(err)
		}
		for _, mode := range benchModes {
			b.Run(fmt.Sprintf("shards=%d/%s", shards, mode.name), func(b *testing.B) {
				defer setPipelined(mode.pipelined)()
				benchDecryptOnce(b, enc, filepath.Join(dir, "out"), key, total, DecryptOptions{VerifyDigests: mode.verify})
			})
		}
		os.RemoveAll(enc)
	}
}

func benchDecryptOnce(b *testing.B, enc, out string, key []byte, total int64, opts DecryptOptions) {
	src := DirSource(enc)
	m, err := Open(context.Background(), src)
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Unlock(key); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(total)
	b.ReportAllocs()
	resetPeakRSS()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		os.RemoveAll(out)
		b.StartTimer()
		st, err := m.Decrypt(context.Background(), src, osSink(out), opts)
		if err != nil {
			b.Fatal(err)
		}
		if st.Bytes != total {
			b.Fatalf("decrypted %d bytes, want %d", st.Bytes, total)
		}
	}
	b.StopTimer()
	reportPeakRSS(b)
	os.RemoveAll(out)
}

func BenchmarkEncrypt(b *testing.B) {
	dir := benchDir(b)
	total := benchMiB(b) << 20
	for _, nFiles := range []int{4, 1} {
		in := writePlain(b, filepath.Join(dir, strconv.Itoa(nFiles)), total, nFiles)
		for _, pipelined := range []bool{true, false} {
			name := fmt.Sprintf("files=%d", nFiles)
			if !pipelined {
				name += "/sha256-inline"
			}
			b.Run(name, func(b *testing.B) {
				defer setPipelined(pipelined)()
				out := filepath.Join(dir, "enc")
				b.SetBytes(total)
				b.ReportAllocs()
				resetPeakRSS()
				b.ResetTimer()
				for range b.N {
					b.StopTimer()
					os.RemoveAll(out)
					b.StartTimer()
					if _, err := Encrypt(context.Background(), testKey(9), in, out, EncryptOptions{}); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				reportPeakRSS(b)
				os.RemoveAll(out)
			})
		}
		os.RemoveAll(filepath.Join(dir, strconv.Itoa(nFiles)))
	}
}

// BenchmarkChunkSizes decrypts the same model encrypted with each chunk size, interleaved
// round by round so that load from other processes hits every size alike, and reports the
// best throughput of each (MB/s, AEAD only and with SHA-256). Default 256 MiB.
//
//	go test -run '^$' -bench ChunkSizes -benchtime 5x ./crypto/modelcrypt/
func BenchmarkChunkSizes(b *testing.B) {
	dir := benchDir(b)
	total := int64(256) << 20
	if os.Getenv("CAI_BENCH_MIB") != "" {
		total = benchMiB(b) << 20
	}
	in := writePlain(b, dir, total, 4)
	key := testKey(9)
	type model struct {
		cs  int
		m   *Model
		src Source
	}
	var models []model
	for _, cs := range benchChunkSizes {
		enc := filepath.Join(dir, fmt.Sprintf("enc-%d", cs))
		if _, err := Encrypt(context.Background(), key, in, enc, EncryptOptions{ChunkSize: cs}); err != nil {
			b.Fatal(err)
		}
		src := DirSource(enc)
		m, err := Open(context.Background(), src)
		if err != nil {
			b.Fatal(err)
		}
		if err := m.Unlock(key); err != nil {
			b.Fatal(err)
		}
		models = append(models, model{cs, m, src})
	}
	os.RemoveAll(filepath.Join(dir, "plain"))
	best := map[string]float64{}
	out := filepath.Join(dir, "out")
	b.ResetTimer()
	for range b.N {
		for _, verify := range []bool{false, true} {
			for _, md := range models {
				b.StopTimer()
				os.RemoveAll(out)
				b.StartTimer()
				start := time.Now()
				if _, err := md.m.Decrypt(context.Background(), md.src, osSink(out), DecryptOptions{VerifyDigests: verify}); err != nil {
					b.Fatal(err)
				}
				mbs := float64(total) / time.Since(start).Seconds() / 1e6
				name := fmt.Sprintf("%dKiB-aead-MB/s", md.cs>>10)
				if verify {
					name = fmt.Sprintf("%dKiB-sha256-MB/s", md.cs>>10)
				}
				best[name] = max(best[name], mbs)
			}
		}
	}
	b.StopTimer()
	os.RemoveAll(out)
	for name, v := range best {
		b.ReportMetric(v, name)
	}
}

// BenchmarkABOneFile compares, interleaved round by round (so that load from other processes
// hits both alike), the dominant-file optimisations on and off for one 1-shard file, and
// reports the best throughput of each. Default 512 MiB.
func BenchmarkABOneFile(b *testing.B) {
	dir := benchDir(b)
	total := int64(512) << 20
	if os.Getenv("CAI_BENCH_MIB") != "" {
		total = benchMiB(b) << 20
	}
	in := writePlain(b, dir, total, 1)
	key := testKey(9)
	enc := filepath.Join(dir, "enc")
	if _, err := Encrypt(context.Background(), key, in, enc, EncryptOptions{}); err != nil {
		b.Fatal(err)
	}
	src := DirSource(enc)
	m, err := Open(context.Background(), src)
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Unlock(key); err != nil {
		b.Fatal(err)
	}
	best := map[string]float64{}
	out := filepath.Join(dir, "out")
	b.ResetTimer()
	for range b.N {
		for _, mode := range benchModes {
			b.StopTimer()
			os.RemoveAll(out)
			restore := setPipelined(mode.pipelined)
			b.StartTimer()
			start := time.Now()
			if _, err := m.Decrypt(context.Background(), src, osSink(out), DecryptOptions{VerifyDigests: mode.verify}); err != nil {
				b.Fatal(err)
			}
			best[mode.name+"-MB/s"] = max(best[mode.name+"-MB/s"], float64(total)/time.Since(start).Seconds()/1e6)
			restore()
		}
	}
	b.StopTimer()
	os.RemoveAll(out)
	for name, v := range best {
		b.ReportMetric(v, name)
	}
}
