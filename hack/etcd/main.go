// Command etcd is etcd's server, pinned for shadowctl's local control plane (hack/setup.sh builds it).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
