module github.com/wsproxy/wsproxy

go 1.26.0

require (
	github.com/gomodule/redigo v1.9.3
	golang.org/x/net v0.62.0
)
