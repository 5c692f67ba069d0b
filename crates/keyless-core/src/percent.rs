//! Percent-decoding (`%XX`), as a server that decodes a path or a URI component reads it: a
//! `%` not followed by two hex digits stays as it is.

/// The bytes `text` stands for.
pub fn decode(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_decode_and_stray_percents_stay() {
        assert_eq!(super::decode("a%2Fb%3a"), b"a/b:");
        assert_eq!(super::decode("100%"), b"100%");
        assert_eq!(super::decode("%zz%4"), b"%zz%4");
    }
}
