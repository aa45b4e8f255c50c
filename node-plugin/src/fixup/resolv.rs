//! `/etc/resolv.conf` exactly as containerd 1.6.20 writes it for a sandbox.

use fast_sandbox_proto::cri::DnsConfig;

/// Renders `dns` the way containerd 1.6.20's `parseDNSOptions`
/// (`pkg/cri/server/sandbox_run_linux.go`) does, byte for byte: a `search`
/// line with the searches joined by spaces, one `nameserver` line per
/// server, an `options` line with the options joined by spaces, each line
/// only when its list is non-empty, in that order. Entries are not
/// validated or trimmed (containerd does neither).
///
/// `None` when all three lists are empty: containerd then copies the node's
/// `/etc/resolv.conf` instead.
pub fn render_resolv_conf(dns: &DnsConfig) -> Option<String> {
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out.push_str("search ");
        out.push_str(&dns.searches.join(" "));
        out.push('\n');
    }
    if !dns.servers.is_empty() {
        out.push_str("nameserver ");
        out.push_str(&dns.servers.join("\nnameserver "));
        out.push('\n');
    }
    if !dns.options.is_empty() {
        out.push_str("options ");
        out.push_str(&dns.options.join(" "));
        out.push('\n');
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(servers: &[&str], searches: &[&str], options: &[&str]) -> DnsConfig {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect();
        DnsConfig {
            servers: v(servers),
            searches: v(searches),
            options: v(options),
        }
    }

    #[test]
    fn kubelet_cluster_first() {
        let got = render_resolv_conf(&dns(
            &["10.209.0.10"],
            &["ns.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            &["ndots:5"],
        ));
        assert_eq!(
            got.as_deref(),
            Some(
                "search ns.svc.cluster.local svc.cluster.local cluster.local\n\
                 nameserver 10.209.0.10\n\
                 options ndots:5\n"
            )
        );
    }

    #[test]
    fn several_servers_one_line_each_and_options_joined() {
        let got = render_resolv_conf(&dns(
            &["10.0.0.1", "10.0.0.2", "fd00::1"],
            &[],
            &["ndots:2", "edns0", "timeout:1"],
        ));
        assert_eq!(
            got.as_deref(),
            Some(
                "nameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver fd00::1\n\
                 options ndots:2 edns0 timeout:1\n"
            )
        );
    }

    #[test]
    fn each_line_only_when_its_list_is_non_empty() {
        assert_eq!(
            render_resolv_conf(&dns(&[], &["a.example"], &[])).as_deref(),
            Some("search a.example\n")
        );
        assert_eq!(
            render_resolv_conf(&dns(&["1.2.3.4"], &[], &[])).as_deref(),
            Some("nameserver 1.2.3.4\n")
        );
        assert_eq!(
            render_resolv_conf(&dns(&[], &[], &["rotate"])).as_deref(),
            Some("options rotate\n")
        );
    }

    #[test]
    fn all_empty_means_copy_the_node_file() {
        assert_eq!(render_resolv_conf(&DnsConfig::default()), None);
    }

    #[test]
    fn entries_are_written_verbatim_like_go() {
        // strings.Join does not skip empty elements and nothing is trimmed.
        assert_eq!(
            render_resolv_conf(&dns(&["", " 1.1.1.1"], &[""], &["a", ""])).as_deref(),
            Some("search \nnameserver \nnameserver  1.1.1.1\noptions a \n")
        );
    }
}
