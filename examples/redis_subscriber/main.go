// Command redis_subscriber plays the worker's part on the way up: it prints
// every message that clients of a session send, which wsproxy publishes to
// session:{session_id}:up.
//
//	go run ./examples/redis_subscriber <session_id>
//
// The structure follows redigo's pub/sub example: one goroutine receives, a
// ticker PINGs so a dead connection is noticed, and Ctrl+C unsubscribes and
// waits for the receiver to see the unsubscription before exiting.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"time"

	"github.com/gomodule/redigo/redis"
)

const usage = "usage: redis_subscriber <session_id>   (REDIS_URL defaults to redis://127.0.0.1:6379)"

// healthCheckPeriod is how often the subscription connection is PINGed; a
// read that sees nothing, not even the PONG, for twice that long means the
// connection is dead.
const healthCheckPeriod = 5 * time.Second

// validID is the proxy's rule for agent and session ids.
var validID = regexp.MustCompile(`^[A-Za-z0-9._~-]{1,128}$`)

func main() {
	if len(os.Args) != 2 || !validID.MatchString(os.Args[1]) {
		fail(2, usage)
	}
	channel := "session:" + os.Args[1] + ":up"

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	redisURL := getenv("REDIS_URL", "redis://127.0.0.1:6379")
	conn, err := redis.DialURLContext(ctx, redisURL,
		redis.DialReadTimeout(2*healthCheckPeriod), redis.DialWriteTimeout(5*time.Second))
	if err != nil {
		fail(1, "cannot connect to Redis at "+redacted(redisURL)+": "+err.Error())
	}
	psc := redis.PubSubConn{Conn: conn}
	defer psc.Close()
	if err := psc.Subscribe(channel); err != nil {
		fail(1, "SUBSCRIBE "+channel+" failed: "+err.Error())
	}

	// receive owns every read of the connection and ends when the
	// subscription is gone or the connection fails.
	done := make(chan error, 1)
	go func() { done <- receive(psc) }()

	ticker := time.NewTicker(healthCheckPeriod)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			if err := psc.Ping(""); err != nil {
				fail(1, "Redis connection lost: "+err.Error())
			}
		case err := <-done:
			if err == nil {
				err = errors.New("subscription ended")
			}
			fail(1, "Redis connection lost: "+err.Error())
		case <-ctx.Done():
			if err := psc.Unsubscribe(); err == nil {
				select {
				case <-done:
				case <-time.After(2 * time.Second):
				}
			}
			fmt.Println("stopped")
			return
		}
	}
}

// receive prints each message until the subscription count drops to zero
// (nil is returned) or the connection fails.
func receive(psc redis.PubSubConn) error {
	for {
		switch message := psc.Receive().(type) {
		case error:
			return message
		case redis.Message:
			fmt.Printf("received on %s: %s\n", message.Channel, message.Data)
		case redis.Subscription:
			switch {
			case message.Kind == "subscribe":
				fmt.Printf("subscribed to %s\n", message.Channel)
			case message.Count == 0:
				return nil
			}
		case redis.Pong:
		default:
			return errors.New("unexpected reply from Redis")
		}
	}
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
