#!/bin/sh
# kindnet-lite: the part of kind's kindnetd that a cluster on one container network needs, for the
# kind node image built here (kindnetd's source is not a Go module the module proxy serves).
# On each node (hostNetwork DaemonSet): write the CNI config for this node's podCIDR (ptp +
# host-local, as kindnetd writes it) and route every other node's podCIDR to that node's
# InternalIP; and masquerade what pods send outside the pod subnet (as kindnetd's ip-masq does:
# CoreDNS forwards to the node's resolvers, whose replies must find their way back).
set -eu
: "${NODE_NAME:?}" "${POD_SUBNET:?}"
# kind sets CONTROL_PLANE_ENDPOINT (host:port): talk to the API server there, not through the
# kubernetes Service, whose ClusterIP is not routed until kube-proxy has programmed this node
# (until then such packets would leave through the host's default route).
if [ -n "${CONTROL_PLANE_ENDPOINT:-}" ]; then
  export KUBERNETES_SERVICE_HOST="${CONTROL_PLANE_ENDPOINT%:*}" KUBERNETES_SERVICE_PORT="${CONTROL_PLANE_ENDPOINT##*:}"
fi
CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d}
CONF=$CONF_DIR/10-kindnet.conflist
while true; do
  iptables -t nat -C POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -j MASQUERADE 2>/dev/null \
    || iptables -t nat -A POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -j MASQUERADE \
    || echo "kindnet-lite: masquerade rule for $POD_SUBNET failed"
  kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' \
    > /tmp/nodes.txt || { sleep 2; continue; }
  while read -r name cidr ip; do
    [ -n "$cidr" ] || continue
    if [ "$name" = "$NODE_NAME" ]; then
      want=$(printf '{"cniVersion":"0.4.0","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false,"mtu":1500,"ipam":{"type":"host-local","dataDir":"/run/cni-ipam-state","routes":[{"dst":"0.0.0.0/0"}],"ranges":[[{"subnet":"%s"}]]}},{"type":"portmap","capabilities":{"portMappings":true}}]}' "$cidr")
      if [ "$(cat "$CONF" 2>/dev/null)" != "$want" ]; then
        printf '%s' "$want" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
        echo "kindnet-lite: wrote $CONF for $cidr"
      fi
    elif [ -n "$ip" ]; then
      ip route replace "$cidr" via "$ip" || echo "kindnet-lite: route $cidr via $ip failed"
    fi
  done < /tmp/nodes.txt
  sleep 10
done
