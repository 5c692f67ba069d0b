//! ARM's deterministic hashes: `uniqueString()` and `guid()`.

/// ARM's `guid()` namespace (a name-based UUID v5 over the arguments joined with '-').
const GUID_NAMESPACE: uuid::Uuid = uuid::uuid!("11fb06fb-712d-4ddd-98c7-e71bbd588830");

/// `uniqueString(a, b, …)`: ARM's 64-bit Murmur variant over the UTF-8 of the arguments joined
/// with '-', as 13 base32 characters (a–z, 2–7), the most significant bits first.
pub(crate) fn unique_string(args: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut h = murmur64(args.join("-").as_bytes());
    let mut out = String::with_capacity(13);
    for _ in 0..13 {
        out.push(ALPHABET[(h >> 59) as usize] as char);
        h <<= 5;
    }
    out
}

/// `guid(a, b, …)`.
pub(crate) fn guid(args: &[&str]) -> String {
    uuid::Uuid::new_v5(&GUID_NAMESPACE, args.join("-").as_bytes()).to_string()
}

fn le32(b: &[u8]) -> u32 {
    b.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (8 * i))
}

/// The Murmur-style 64-bit hash ARM's expression engine uses (two 32-bit lanes).
pub(crate) fn murmur64(data: &[u8]) -> u64 {
    const C1: u32 = 597_399_067;
    const C2: u32 = 2_869_860_233;
    let len = data.len();
    let (mut h1, mut h2) = (0u32, 0u32);
    let mut i = 0;
    while i + 8 <= len {
        let k1 = le32(&data[i..i + 4])
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h1 = (h1 ^ k1)
            .rotate_left(19)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(1_444_728_091);
        let k2 = le32(&data[i + 4..i + 8])
            .wrapping_mul(C2)
            .rotate_left(17)
            .wrapping_mul(C1);
        h2 = (h2 ^ k2)
            .rotate_left(13)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(197_830_471);
        i += 8;
    }
    let tail = len - i;
    if tail > 0 {
        let k1 = le32(&data[i..i + tail.min(4)])
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h1 ^= k1;
        if tail > 4 {
            let k2 = le32(&data[i + 4..len])
                .wrapping_mul(C2)
                .rotate_left(17)
                .wrapping_mul(C1);
            h2 ^= k2;
        }
    }
    h1 ^= len as u32;
    h2 ^= len as u32;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    let fmix = |mut h: u32| {
        h ^= h >> 16;
        h = h.wrapping_mul(2_246_822_507);
        h ^= h >> 13;
        h = h.wrapping_mul(3_266_489_909);
        h ^ (h >> 16)
    };
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    ((h2 as u64) << 32) | h1 as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_string_matches_published_azure_values() {
        // Pairs published with public ports that were checked against Azure / Bicep: Microsoft's
        // terraform-provider-azapi (`provider::azapi::unique_string`, a 7-byte tail) and a bash port
        // verified against Bicep.
        assert_eq!(
            unique_string(&[
                "/subscriptions/00000000-0000-0000-0000-000000000000",
                "resource-id"
            ]),
            "cwvxuqg24sifi"
        );
        assert_eq!(unique_string(&["test"]), "rbgf3xv4ufgzg");
        assert_eq!(unique_string(&["hello", "world"]), "a7wkljktk6wne");
        assert_eq!(unique_string(&["abc"]), "cgtzqvhu4i23s");
        assert_eq!(
            unique_string(&[
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/my-rg"
            ]),
            "bmg7c6xu4tw46"
        );
        assert_eq!(unique_string(&["foo", "bar", "baz"]), "xzi4ioaxtmth4");
    }

    #[test]
    fn guid_is_uuid_v5_in_arm_namespace() {
        // python: uuid.uuid5(uuid.UUID('11fb06fb-712d-4ddd-98c7-e71bbd588830'), 'a-b')
        let g = guid(&["a", "b"]);
        assert_eq!(g, guid(&["a-b"]));
        assert_eq!(g, "2d796349-8c7e-55ec-9624-54ece82ed031");
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "5");
    }
}
