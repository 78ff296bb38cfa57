package agent_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cai-agent/cai-agent/agent"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc/offline"
)

// A model owner encrypted a model; inside the TEE, Run measures, gets the key, decrypts into
// tmpfs, measures the model and publishes it. Here the sample TEE and the offline broker
// stand in for TDX and a KBS.
func Example() {
	ctx := context.Background()
	tmp, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(tmp)

	// Model owner: a one-file model, encrypted under a key whose hint names its KBS resource.
	key := bytes.Repeat([]byte{1}, modelcrypt.KeySize)
	os.WriteFile(filepath.Join(tmp, "weights.bin"), []byte("not really weights"), 0o644)
	_, err := modelcrypt.Encrypt(ctx, key, []modelcrypt.InputFile{{Name: "weights.bin", Path: filepath.Join(tmp, "weights.bin")}},
		filepath.Join(tmp, "enc"), modelcrypt.EncryptOptions{KeyHint: "kbs:///default/model-key/example"})
	if err != nil {
		log.Fatal(err)
	}
	os.WriteFile(filepath.Join(tmp, "key"), key, 0o600)

	// In the TEE.
	tee, err := evidence.Open(ctx, evidence.Options{TEE: evidence.TEESample, StateDir: filepath.Join(tmp, "state")})
	if err != nil {
		log.Fatal(err)
	}
	defer tee.Close()
	broker, err := offline.New(offline.Options{KeyFile: filepath.Join(tmp, "key")})
	if err != nil {
		log.Fatal(err)
	}
	res, err := agent.Run(ctx, agent.Config{
		Source:        modelcrypt.DirSource(filepath.Join(tmp, "enc")), // or agent.NewHTTPSource("https://…/", …)
		Out:           filepath.Join(tmp, "out"),                       // on tmpfs in production
		Evidence:      tee,
		Broker:        broker,
		ModelName:     "example",
		AllowNonTmpfs: true, // only because this example writes to a disk directory
		Logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		log.Fatal(err) // a *agent.StepError naming the step
	}
	b, _ := os.ReadFile(filepath.Join(tmp, "out", "weights.bin"))
	fmt.Printf("%s: %d file, %d bytes: %q\n", res.Kind, res.Files, res.Bytes, b)
	for _, m := range res.Measurements {
		fmt.Println("measured", m.Operation)
	}
	// Output:
	// files: 1 file, 18 bytes: "not really weights"
	// measured Model
}

// NewHTTPSource reads an encrypted model from a static server or object storage; transfers
// cut mid-stream are resumed with Range requests.
func ExampleNewHTTPSource() {
	src, err := agent.NewHTTPSource("https://models.example.com/encrypted/llama3-8b/", agent.HTTPOptions{
		CAFile:  "", // system roots; or a PEM bundle
		Retries: 5,
	})
	if err != nil {
		log.Fatal(err)
	}
	u, _ := src.URL("model.cai")
	fmt.Println(u)
	// Output: https://models.example.com/encrypted/llama3-8b/model.cai
}
