package verify

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"testing"
)

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

// TestMain silences the evidence runtime's info logs (the sample TEE used to build bundles).
func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	os.Exit(m.Run())
}
