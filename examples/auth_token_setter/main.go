// Command auth_token_setter stores a session's token where wsproxy's redis
// auth mode looks for it: the string key session:{session_id}:auth.
//
//	go run ./examples/auth_token_setter <session_id> <token> [ttl_secs]
//
// In a real deployment the worker that creates a session does this (see
// examples/fastapi_worker). The token must reach the proxy within ttl_secs
// (default 3600); on each successful connect the proxy itself resets the
// key's TTL to AUTH_GRACE_PERIOD_SECS. The token is never printed.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strconv"

	"github.com/gomodule/redigo/redis"
)

const usage = "usage: auth_token_setter <session_id> <token> [ttl_secs]   (REDIS_URL defaults to redis://127.0.0.1:6379)"

// validID is the proxy's rule for agent and session ids.
var validID = regexp.MustCompile(`^[A-Za-z0-9._~-]{1,128}$`)

func main() {
	args := os.Args[1:]
	if len(args) < 2 || len(args) > 3 || !validID.MatchString(args[0]) || args[1] == "" {
		fail(2, usage)
	}
	sessionID, token := args[0], args[1]
	ttl := 3600
	if len(args) == 3 {
		n, err := strconv.Atoi(args[2])
		if err != nil || n < 1 {
			fail(2, usage)
		}
		ttl = n
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	redisURL := getenv("REDIS_URL", "redis://127.0.0.1:6379")
	conn, err := redis.DialURLContext(ctx, redisURL)
	if err != nil {
		fail(1, "cannot connect to Redis at "+redacted(redisURL)+": "+err.Error())
	}
	defer conn.Close()

	key := "session:" + sessionID + ":auth"
	if _, err := redis.DoContext(conn, ctx, "SET", key, token, "EX", ttl); err != nil {
		fail(1, "SET "+key+" failed: "+err.Error())
	}
	fmt.Printf("stored token for session %s in %s (expires in %d s)\n", sessionID, key, ttl)
}

func getenv(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// redacted hides a password in a Redis URL before it is printed.
func redacted(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil {
		return u.Redacted()
	}
	return "(malformed REDIS_URL)"
}

func fail(status int, message string) {
	fmt.Fprintln(os.Stderr, message)
	os.Exit(status)
}
