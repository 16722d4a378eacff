// Command redis_publisher plays the worker's part on the way down: it
// publishes data messages to session:{session_id}:down, which wsproxy
// delivers to every WebSocket connection of that session.
//
//	go run ./examples/redis_publisher [-interval 2s] [-count 0] [-text hello] [session_id]
//
// session_id defaults to "demo". For each message it prints the number PUBLISH
// returned: how many subscribers received it. While clients of the session
// are connected that is 1 per proxy instance holding them; 0 means no proxy
// was subscribed and the message is lost (Redis pub/sub keeps nothing).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"time"

	"github.com/gomodule/redigo/redis"
)

const usage = "usage: redis_publisher [-interval 2s] [-count N] [-text TEXT] [session_id]   (REDIS_URL defaults to redis://127.0.0.1:6379)"

// validID is the proxy's rule for agent and session ids.
var validID = regexp.MustCompile(`^[A-Za-z0-9._~-]{1,128}$`)

// dataMessage is the shape workers publish for clients: {"type":"data","payload":...}.
type dataMessage struct {
	Type    string `json:"type"`
	Payload string `json:"payload"`
}

func main() {
	flags := flag.NewFlagSet("redis_publisher", flag.ContinueOnError)
	flags.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	interval := flags.Duration("interval", 2*time.Second, "time between messages")
	count := flags.Int("count", 0, "number of messages to publish; 0 publishes until Ctrl+C")
	text := flags.String("text", "hello", "payload text; the message number is appended")
	if err := flags.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	sessionID := "demo"
	switch flags.NArg() {
	case 0:
	case 1:
		sessionID = flags.Arg(0)
	default:
		fail(2, usage)
	}
	if !validID.MatchString(sessionID) || *interval <= 0 || *count < 0 {
		fail(2, usage)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	redisURL := getenv("REDIS_URL", "redis://127.0.0.1:6379")
	conn, err := redis.DialURLContext(ctx, redisURL)
	if err != nil {
		fail(1, "cannot connect to Redis at "+redacted(redisURL)+": "+err.Error())
	}
	defer conn.Close()

	channel := "session:" + sessionID + ":down"
	ticker := time.NewTicker(*interval)
	defer ticker.Stop()
	for n := 1; *count == 0 || n <= *count; n++ {
		if n > 1 {
			select {
			case <-ctx.Done():
				fmt.Println("stopped")
				return
			case <-ticker.C:
			}
		}
		message, _ := json.Marshal(dataMessage{Type: "data", Payload: fmt.Sprintf("%s %d", *text, n)})
		receivers, err := redis.Int(redis.DoContext(conn, ctx, "PUBLISH", channel, message))
		if ctx.Err() != nil {
			fmt.Println("stopped")
			return
		}
		if err != nil {
			fail(1, "PUBLISH "+channel+" failed: "+err.Error())
		}
		fmt.Printf("published to %s: %s (receivers: %d)\n", channel, message, receivers)
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
