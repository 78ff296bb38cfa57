package agent

import (
	"bufio"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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

// cpuTime returns the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter sums the CPU time of the timed parts of a benchmark; report adds "cpu-util", the
// CPU time per wall time of the timed parts (2 = both cores of the 2-core VM busy
// throughout), which shows whether a pipeline is CPU-bound or waiting.
type cpuMeter struct {
	cpu, wall time.Duration
	c0        time.Duration
	w0        time.Time
}

func (m *cpuMeter) start() { m.c0, m.w0 = cpuTime(), time.Now() }
func (m *cpuMeter) stop()  { m.cpu += cpuTime() - m.c0; m.wall += time.Since(m.w0) }
func (m *cpuMeter) report(b *testing.B) {
	if m.wall > 0 {
		b.ReportMetric(m.cpu.Seconds()/m.wall.Seconds(), "cpu-util")
	}
}

func BenchmarkDecryptOnly(b *testing.B) {
	dir, key, size := setupBenchModel(b)
	b.SetBytes(size)
	var cm cpuMeter
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		out := benchOut(b)
		b.StartTimer()
		cm.start()
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
		cm.stop()
		b.StopTimer()
		os.RemoveAll(out)
		b.StartTimer()
	}
	reportPeakRSS(b)
	cm.report(b)
	b.ReportMetric(cm.cpu.Seconds()/float64(b.N), "cpu-s/op")
}

func benchRun(b *testing.B, src func(dir string) modelcrypt.Source) {
	dir, key, size := setupBenchModel(b)
	b.SetBytes(size)
	var cm cpuMeter
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		out := benchOut(b)
		b.StartTimer()
		cm.start()
		if _, err := Run(context.Background(), Config{Source: src(dir), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}}); err != nil {
			b.Fatal(err)
		}
		cm.stop()
		b.StopTimer()
		os.RemoveAll(out)
		b.StartTimer()
	}
	reportPeakRSS(b)
	cm.report(b)
	b.ReportMetric(cm.cpu.Seconds()/float64(b.N), "cpu-s/op")
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

// BenchmarkFetchAndDecryptHTTPServerProcess is BenchmarkFetchAndDecryptHTTP with the loopback
// server (the same http.FileServer) in a child process: cpu-s/op is then the agent's own CPU
// time, without the server's. Compared with BenchmarkDecryptOnly's cpu-s/op it is what
// fetch-and-decrypt from HTTP costs the machine it runs on when the server is elsewhere (an
// object store); ns/op still includes competing with the server for the same cores.
func BenchmarkFetchAndDecryptHTTPServerProcess(b *testing.B) {
	dir, _, _ := setupBenchModel(b)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "CAI_BENCH_FILESERVER="+dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		stdin.Close() // the child exits when its stdin closes
		cmd.Wait()
	}()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("file server child: %v", err)
	}
	base := "http://" + strings.TrimSpace(line)
	benchRun(b, func(string) modelcrypt.Source {
		s, err := NewHTTPSource(base, HTTPOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return s
	})
}

// benchFileServer serves dir on a loopback port, prints the address on stdout and returns
// when stdin is closed.
func benchFileServer(dir string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	go http.Serve(ln, http.FileServer(http.Dir(dir)))
	fmt.Println(ln.Addr())
	io.Copy(io.Discard, os.Stdin)
}

// BenchmarkFetchOnly reads every shard object of the model without decrypting (two at a
// time, 1 MiB reads, like the two workers of the 2-core machine): from the directory
// (page cache) and through the same loopback HTTP server and client as
// BenchmarkFetchAndDecryptHTTP. The difference of their cpu-s/op is what the transfer alone
// adds to fetch-and-decrypt on a machine where the server shares the CPUs.
func BenchmarkFetchOnly(b *testing.B) {
	dir, _, size := setupBenchModel(b)
	ents, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if filepath.Ext(e.Name()) == ".shard" {
			names = append(names, e.Name())
		}
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(dir)))
	defer srv.Close()
	hs, err := NewHTTPSource(srv.URL, HTTPOptions{})
	if err != nil {
		b.Fatal(err)
	}
	for _, src := range []struct {
		name string
		src  modelcrypt.Source
	}{{"dir", modelcrypt.DirSource(dir)}, {"http", hs}} {
		b.Run(src.name, func(b *testing.B) {
			benchReadAll(b, size, len(names), func(i int) (io.ReadCloser, error) {
				return src.src.Open(context.Background(), names[i], 0)
			})
		})
	}
}

// benchReadAll reads objects 0..n-1 (size bytes in all) b.N times, two at a time (like the
// two workers of the 2-core machine), into 1 MiB buffers, discarding them, and reports the
// CPU time per run (cpu-s/op) and cpu-util.
func benchReadAll(b *testing.B, size int64, n int, open func(i int) (io.ReadCloser, error)) {
	b.SetBytes(size)
	var cm cpuMeter
	for range b.N {
		cm.start()
		work := make(chan int, n)
		for i := range n {
			work <- i
		}
		close(work)
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				buf := make([]byte, 1<<20+16)
				for i := range work {
					rc, err := open(i)
					if err != nil {
						b.Error(err)
						return
					}
					_, err = io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{rc}, buf)
					rc.Close()
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		cm.stop()
	}
	cm.report(b)
	b.ReportMetric(cm.cpu.Seconds()/float64(b.N), "cpu-s/op")
}

// BenchmarkLoopbackTransfer moves the model's shard objects over loopback with no HTTP and no
// decryption: the sender sendfile(2)s each object, two connections at a time, the receiver
// reads into a 1 MiB buffer and discards. tcp against unix (a Unix socket) isolates what the
// kernel's loopback TCP path costs this machine (cpu-s/op), which is the floor of what
// fetch-and-decrypt from a loopback HTTP server adds to decryption.
func BenchmarkLoopbackTransfer(b *testing.B) {
	dir, _, size := setupBenchModel(b)
	shards, err := filepath.Glob(filepath.Join(dir, "*.shard"))
	if err != nil || len(shards) == 0 {
		b.Fatal("no shards", err)
	}
	for _, network := range []string{"tcp", "unix"} {
		b.Run(network, func(b *testing.B) {
			addr := "127.0.0.1:0"
			if network == "unix" {
				addr = filepath.Join(b.TempDir(), "s")
			}
			ln, err := net.Listen(network, addr)
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go func() {
						defer c.Close()
						var name [1]byte
						if _, err := io.ReadFull(c, name[:]); err != nil {
							return
						}
						f, err := os.Open(shards[name[0]])
						if err != nil {
							return
						}
						defer f.Close()
						io.Copy(c, f) // sendfile(2)
					}()
				}
			}()
			benchReadAll(b, size, len(shards), func(i int) (io.ReadCloser, error) {
				c, err := net.Dial(network, ln.Addr().String())
				if err != nil {
					return nil, err
				}
				if _, err := c.Write([]byte{byte(i)}); err != nil {
					c.Close()
					return nil, err
				}
				return c, nil
			})
		})
	}
}
