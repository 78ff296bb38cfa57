package agent

import (
	"encoding/base64"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv("CAI_BENCH_FILESERVER"); dir != "" {
		benchFileServer(dir) // the child process of BenchmarkFetchAndDecryptHTTPServerProcess
		return
	}
	if os.Getenv("CAI_TEST_LOG") == "" {
		slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	}
	code := m.Run()
	if benchModel.dir != "" { // the benchmarks' encrypted model (1 GiB by default)
		os.RemoveAll(filepath.Dir(benchModel.dir))
	}
	os.Exit(code)
}

func base64Std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func fileSize(t testing.TB, p string) int64 {
	fi, err := os.Stat(p)
	require.NoError(t, err)
	return fi.Size()
}
