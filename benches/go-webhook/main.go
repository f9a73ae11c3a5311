// A controller-runtime mutating webhook doing the mutation chiller-metrics
// does for its benchmark fixtures: the peer most users would pick, for
// `make bench` and `make bench-admission` (BENCHMARKS.md).
//
//	go-webhook --listen 127.0.0.1:18443 --admin-listen 127.0.0.1:19090 \
//	  --cert-dir DIR --mapping src/inject/statsd-mapping.yaml
//
// DIR holds tls.crt and tls.key; the webhook is served at /mutate over TLS
// (HTTP/1.1 and HTTP/2), and /readyz over plain HTTP on the admin address.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"sigs.k8s.io/controller-runtime/pkg/webhook"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18443", "webhook address (TLS)")
	admin := flag.String("admin-listen", "127.0.0.1:19090", "plain HTTP address of /readyz")
	certDir := flag.String("cert-dir", "", "folder with tls.crt and tls.key")
	mappingFile := flag.String("mapping", "", "the statsd mapping chiller-metrics puts in its annotation")
	flag.Parse()
	if err := run(*listen, *admin, *certDir, *mappingFile); err != nil {
		fmt.Fprintln(os.Stderr, "go-webhook:", err)
		os.Exit(1)
	}
}

func run(listen, admin, certDir, mappingFile string) error {
	mapping, err := os.ReadFile(mappingFile)
	if err != nil {
		return err
	}
	host, portText, err := net.SplitHostPort(listen)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return err
	}
	server := webhook.NewServer(webhook.Options{Host: host, Port: port, CertDir: certDir})
	server.Register("/mutate", &webhook.Admission{Handler: newInjector(string(mapping))})

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errs := make(chan error, 2)
	go func() { errs <- server.Start(ctx) }()
	readyz := http.NewServeMux()
	readyz.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := server.StartedChecker()(r); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	adminServer := &http.Server{Addr: admin, Handler: readyz}
	go func() { errs <- adminServer.ListenAndServe() }()
	select {
	case <-ctx.Done():
		_ = adminServer.Close()
		return nil
	case err := <-errs:
		return err
	}
}
