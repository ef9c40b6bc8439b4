// Command etcd is etcd's own server entry point, built at the version the
// Kubernetes release pins (Debian's etcd 3.4 is older than recent apiservers support).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
