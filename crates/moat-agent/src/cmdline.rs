//! The kernel command line: how the host configures the agent.

/// `key=value` and bare `key` words of a kernel command line, in order.
#[derive(Debug, Default, Clone)]
pub struct Cmdline {
    words: Vec<(String, Option<String>)>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut push = |w: &mut String| {
            if !w.is_empty() {
                let word = std::mem::take(w);
                match word.split_once('=') {
                    Some((k, v)) => words.push((k.to_string(), Some(v.to_string()))),
                    None => words.push((word, None)),
                }
            }
        };
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => push(&mut cur),
                c => cur.push(c),
            }
        }
        push(&mut cur);
        Cmdline { words }
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.words.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
    }

    /// Parameters for module `module` given as `module.param=value`, joined as the kernel expects.
    pub fn module_params(&self, module: &str) -> String {
        let module = module.replace('-', "_");
        self.words
            .iter()
            .filter_map(|(k, v)| {
                let (m, p) = k.split_once('.')?;
                (m.replace('-', "_") == module).then(|| match v {
                    Some(v) if v.contains(' ') => format!("{p}=\"{v}\""),
                    Some(v) => format!("{p}={v}"),
                    None => p.to_string(),
                })
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_quotes_and_module_params() {
        let c = Cmdline::parse(
            "console=ttyS0 quiet moat.root=/dev/vda virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.device=512@0xfeb00c00:11 x=\"a b\"\n",
        );
        assert_eq!(c.get("moat.root"), Some("/dev/vda"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("x"), Some("a b"));
        assert_eq!(c.module_params("virtio_mmio"), "device=512@0xfeb00e00:12 device=512@0xfeb00c00:11");
        assert_eq!(c.module_params("virtio_blk"), "");
    }
}
