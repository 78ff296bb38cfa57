// Package kbc holds cai-agent's key broker clients: Confidential Containers Trustee (RCAR),
// Intel Trust Authority KBS v1, and an offline broker for development. Each proves the TEE
// with an injected evidence.Attester and returns the released secret.
package kbc

import (
	"context"
)

// Client gets a secret from a key broker.
type Client interface {
	// GetResource returns the secret named by uri: a Trustee resource URI
	// (kbs:///repo/type/tag; the host part is ignored), an ITA key id, or an offline name.
	// The secret is never logged, and never appears in an error.
	GetResource(ctx context.Context, uri string) ([]byte, error)
}
