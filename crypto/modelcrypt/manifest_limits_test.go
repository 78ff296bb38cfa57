package modelcrypt

import (
	"bytes"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// A hostile header (no key needed, read at Open) must not make the manifest parser allocate
// far more than the manifest's own size (SPEC.md §8: the manifest limit bounds the parser's
// memory). Tiny array elements ({} or null) used to cost ~150 bytes of Go structs per 3 bytes
// of JSON: 2.4 GB allocated (1.3 GB resident) for one 16 MiB manifest.
func TestManifestParserMemoryBounded(t *testing.T) {
	digest := `"sha256":"` + strings.Repeat("0", 64) + `"`
	for name, c := range map[string]struct{ head, elem, tail string }{
		"empty files": {`{"chunk_size":64,"files":[`, `{},`, `{}],"kind":"files","shard_size":64}`},
		"null files":  {`{"chunk_size":64,"files":[`, `null,`, `null],"kind":"files","shard_size":64}`},
		"empty shards": {`{"chunk_size":64,"files":[{"path":"a",` + digest + `,"shards":[`, `{},`,
			`{}],"size":0}],"kind":"files","shard_size":64}`},
		"null shards": {`{"chunk_size":64,"files":[{"path":"a",` + digest + `,"shards":[`, `null,`,
			`null],"size":0}],"kind":"files","shard_size":64}`},
	} {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			b.WriteString(c.head)
			for b.Len() < MaxManifestSize-len(c.elem)-len(c.tail) {
				b.WriteString(c.elem)
			}
			b.WriteString(c.tail)
			require.LessOrEqual(t, b.Len(), MaxManifestSize)

			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := parseManifest(b.Bytes())
			runtime.ReadMemStats(&after)
			require.ErrorIs(t, err, ErrCorrupt)
			alloc := after.TotalAlloc - before.TotalAlloc
			require.Less(t, alloc, uint64(8*b.Len()), "allocated %d MiB to reject a %d MiB manifest", alloc>>20, b.Len()>>20)
		})
	}
}
