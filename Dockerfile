# wsproxy in a scratch image: a static binary and nothing else.
#   docker build -t wsproxy .
#   docker run -p 8080:8080 -e REDIS_URL=redis://redis:6379 wsproxy
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY main.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /wsproxy .

FROM scratch
# Only rediss:// needs CA certificates; redis:// needs no file at all.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/
COPY --from=build /wsproxy /wsproxy
# nobody: the proxy needs no privileges (listen on a port above 1024).
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/wsproxy"]
