//! Patch files (docs/patch-format.md, version 1) as bakedb-serve reads them: the header checked
//! field by field, and the page map that says where each page of the composed file comes from.
//! Pure: bytes in, a map out; the files and the memory they are mapped to are vfs.rs's.
//!
//! bakedb-init has verified every patch against image.json before serve starts, so a patch that
//! fails here was damaged or put there by hand; it is refused with what is wrong rather than
//! read past its end or composed into a database SQLite would call corrupt.

use std::fmt;

pub const MAGIC: &[u8; 8] = b"BKDBPTCH";
pub const VERSION: u32 = 1;
/// Magic, version, page size, composed length, page count, composed digest.
pub const HEADER_BYTES: usize = 64;
pub const MIN_PAGE_SIZE: u32 = 512;
pub const MAX_PAGE_SIZE: u32 = 65536;
/// SQLite's largest page count (4294967294): no database is longer, so no patch may be.
const MAX_PAGES: u64 = u32::MAX as u64 - 1;

/// What is wrong with a patch file, one sentence without the file's name (the caller adds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    TooShort {
        len: u64,
    },
    Magic {
        found: [u8; 8],
    },
    Version {
        found: u32,
    },
    PageSize {
        found: u32,
    },
    Length {
        len: u64,
        page_size: u32,
    },
    TooLong {
        len: u64,
    },
    TooManyPages {
        count: u64,
        pages: u64,
    },
    Size {
        len: u64,
        expected: u64,
    },
    PageNumber {
        index: u64,
        number: u64,
        pages: u64,
    },
    Order {
        index: u64,
        number: u64,
        previous: u64,
    },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::TooShort { len } => write!(
                f,
                "is {len} bytes, shorter than the {HEADER_BYTES}-byte patch header"
            ),
            Invalid::Magic { found } => write!(
                f,
                "is not a bakedb patch: it starts with {:?}, not {:?}",
                String::from_utf8_lossy(found),
                String::from_utf8_lossy(MAGIC)
            ),
            Invalid::Version { found } => write!(
                f,
                "is patch format version {found}; this bakedb-serve reads version {VERSION}"
            ),
            Invalid::PageSize { found } => write!(
                f,
                "has page size {found}: expected a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            ),
            Invalid::Length { len, page_size } => write!(
                f,
                "gives the composed file a length of {len} bytes, not a multiple of its page size {page_size}"
            ),
            Invalid::TooLong { len } => write!(
                f,
                "gives the composed file a length of {len} bytes, more pages than SQLite can address"
            ),
            Invalid::TooManyPages { count, pages } => write!(
                f,
                "says it holds {count} pages, more than the {pages} pages of the composed file"
            ),
            Invalid::Size { len, expected } if len < expected => write!(
                f,
                "is truncated: {len} bytes, its header says {expected} (header, page numbers and pages)"
            ),
            Invalid::Size { len, expected } => write!(
                f,
                "is {len} bytes, its header says {expected}: {} bytes follow the last page",
                len - expected
            ),
            Invalid::PageNumber {
                index,
                number,
                pages,
            } => write!(
                f,
                "has page number {number} (entry {index}), out of range: the composed file has {pages} pages"
            ),
            Invalid::Order {
                index,
                number,
                previous,
            } => write!(
                f,
                "has page number {number} (entry {index}) after {previous}: page numbers must be strictly increasing"
            ),
        }
    }
}

/// A patch file's header, checked against the file's bytes: every page number is in range
/// and in order, and the file holds exactly the pages it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    page_size: u32,
    /// The composed file's length after this patch.
    len: u64,
    /// Pages in the patch.
    count: u64,
    /// SHA-256 of the composed file's chunk digests (not checked here: bakedb-init checks
    /// the composed file's pieces against image.json, and hashing the whole composed file
    /// at every start is what image.json's chunk list exists to avoid).
    digest: [u8; 32],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Reads and checks the header of the patch file `bytes` (the whole file).
    pub fn parse(bytes: &[u8]) -> Result<Header, Invalid> {
        let file_len = bytes.len() as u64;
        if bytes.len() < HEADER_BYTES {
            return Err(Invalid::TooShort { len: file_len });
        }
        let magic: [u8; 8] = bytes[0..8].try_into().expect("8 bytes");
        if &magic != MAGIC {
            return Err(Invalid::Magic { found: magic });
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(Invalid::Version { found: version });
        }
        let page_size = u32_at(bytes, 12);
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(Invalid::PageSize { found: page_size });
        }
        let len = u64_at(bytes, 16);
        if !len.is_multiple_of(u64::from(page_size)) {
            return Err(Invalid::Length { len, page_size });
        }
        let pages = len / u64::from(page_size);
        if pages > MAX_PAGES {
            return Err(Invalid::TooLong { len });
        }
        let count = u64_at(bytes, 24);
        if count > pages {
            return Err(Invalid::TooManyPages { count, pages });
        }
        // No overflow: count <= pages < 2^32 and page_size <= 2^16.
        let expected = HEADER_BYTES as u64 + count * 8 + count * u64::from(page_size);
        if file_len != expected {
            return Err(Invalid::Size {
                len: file_len,
                expected,
            });
        }
        let header = Header {
            page_size,
            len,
            count,
            digest: bytes[32..64].try_into().expect("32 bytes"),
        };
        let mut previous = None;
        for index in 0..count {
            let number = header.page_number(bytes, index);
            if number >= pages {
                return Err(Invalid::PageNumber {
                    index,
                    number,
                    pages,
                });
            }
            if let Some(previous) = previous
                && number <= previous
            {
                return Err(Invalid::Order {
                    index,
                    number,
                    previous,
                });
            }
            previous = Some(number);
        }
        Ok(header)
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The composed file's length once this patch is applied.
    pub fn composed_len(&self) -> u64 {
        self.len
    }

    /// How many pages the patch holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The page number of entry `index` (< count) of the patch file `bytes`.
    pub fn page_number(&self, bytes: &[u8], index: u64) -> u64 {
        u64_at(bytes, HEADER_BYTES + index as usize * 8)
    }

    /// Where the bytes of entry `index` start in the file.
    pub fn page_offset(&self, index: u64) -> u64 {
        HEADER_BYTES as u64 + self.count * 8 + index * u64::from(self.page_size)
    }
}

/// Where one page of the composed file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Zeros: past the base's end and in no patch (a builder never leaves such a page, but
    /// the map must not point past the base).
    Zero,
    /// The same page of the base file (its end may fall inside the page: the rest is zeros).
    Base,
    /// Entry `slot` of patch `patch` (counted from 0, oldest first).
    Patch { patch: usize, slot: u64 },
}

/// The composed file's pages, one u32 each: 0 zeros, 1 the base, 2 + n the n-th page of all
/// patches counted together (oldest patch first). Built once at start, while the patches are
/// applied in order; vfs.rs turns it into what SQLite's reads look up (a bit per page and a
/// pointer for the pages that are not the base's) and drops it.
#[derive(Debug, Clone)]
pub struct PageMap {
    page_size: u32,
    len: u64,
    pages: Vec<u32>,
    /// Where each patch's entries start in the count of all patches' pages.
    first_slots: Vec<u64>,
    /// Where the next patch's entries will start.
    next_slot: u64,
}

const ZERO: u32 = 0;
const BASE: u32 = 1;
const FIRST_PATCH_SLOT: u64 = 2;

impl PageMap {
    /// The base file of `base_len` bytes alone, cut into pages of `page_size`.
    pub fn new(page_size: u32, base_len: u64) -> Result<PageMap, String> {
        let pages = base_len.div_ceil(u64::from(page_size));
        let mut map = PageMap {
            page_size,
            len: base_len,
            pages: Vec::new(),
            first_slots: Vec::new(),
            next_slot: FIRST_PATCH_SLOT,
        };
        map.resize(pages, BASE)?;
        Ok(map)
    }

    fn resize(&mut self, pages: u64, fill: u32) -> Result<(), String> {
        let pages = usize::try_from(pages)
            .ok()
            .filter(|&p| p <= MAX_PAGES as usize)
            .ok_or_else(|| format!("{pages} pages are more than SQLite can address"))?;
        if pages > self.pages.len() {
            self.pages
                .try_reserve_exact(pages - self.pages.len())
                .map_err(|_| {
                    format!(
                        "no memory for the page map of {pages} pages ({} bytes)",
                        pages * 4
                    )
                })?;
        }
        self.pages.resize(pages, fill);
        Ok(())
    }

    /// Applies the next patch, as docs/patch-format.md composes: the length becomes `len`
    /// (pages past it are dropped, new ones are zeros), then each page of `numbers` (its
    /// entries in order) comes from this patch. `len` is a multiple of the page size and
    /// `numbers` increase below `len / page_size`: Header::parse checked both.
    pub fn apply(&mut self, len: u64, numbers: impl Iterator<Item = u64>) -> Result<(), String> {
        self.resize(len / u64::from(self.page_size), ZERO)?;
        self.len = len;
        let first = self.next_slot;
        let mut next = first;
        for number in numbers {
            let slot = u32::try_from(next).map_err(|_| {
                format!(
                    "the patches hold more than {} pages together, more than the page map counts",
                    u32::MAX as u64 - FIRST_PATCH_SLOT
                )
            })?;
            // In range: Header::parse checked number < len / page_size, the new length.
            self.pages[number as usize] = slot;
            next += 1;
        }
        self.first_slots.push(first);
        self.next_slot = next;
        Ok(())
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The composed file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where page `page` comes from; zeros past the end.
    pub fn source(&self, page: u64) -> Source {
        match usize::try_from(page).ok().and_then(|p| self.pages.get(p)) {
            None | Some(&ZERO) => Source::Zero,
            Some(&BASE) => Source::Base,
            Some(&slot) => {
                let slot = u64::from(slot);
                // Few patches (a chain is cut at --max-patches): a search over a handful.
                let patch = self.first_slots.partition_point(|&first| first <= slot) - 1;
                Source::Patch {
                    patch,
                    slot: slot - self.first_slots[patch],
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A patch file as docs/patch-format.md lays it out (the digest is not read here).
    pub(crate) fn patch_bytes(page_size: u32, len: u64, pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&page_size.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0xd1; 32]);
        for (number, _) in pages {
            out.extend_from_slice(&number.to_le_bytes());
        }
        for (_, bytes) in pages {
            out.extend_from_slice(bytes);
        }
        out
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; 512]
    }

    #[test]
    fn a_well_formed_header_is_read() {
        let bytes = patch_bytes(512, 4 * 512, &[(0, page(1)), (3, page(2))]);
        let header = Header::parse(&bytes).unwrap();
        assert_eq!(
            (header.page_size(), header.composed_len(), header.count()),
            (512, 2048, 2)
        );
        assert_eq!(header.digest(), &[0xd1; 32]);
        assert_eq!(header.page_number(&bytes, 1), 3);
        let at = header.page_offset(1) as usize;
        assert_eq!(&bytes[at..at + 512], &page(2)[..]);
        // A patch may hold no page at all (only a new length).
        Header::parse(&patch_bytes(65536, 0, &[])).unwrap();
    }

    #[test]
    fn every_broken_field_is_refused_with_what_is_wrong() {
        let good = patch_bytes(512, 4 * 512, &[(1, page(1)), (2, page(2))]);
        let with = |at: usize, value: &[u8]| {
            let mut bytes = good.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        let cases: Vec<(Vec<u8>, Invalid, &str)> = vec![
            (
                good[..63].to_vec(),
                Invalid::TooShort { len: 63 },
                "is 63 bytes, shorter than the 64-byte patch header",
            ),
            (
                with(0, b"SQLite f"),
                Invalid::Magic {
                    found: *b"SQLite f",
                },
                "is not a bakedb patch: it starts with \"SQLite f\", not \"BKDBPTCH\"",
            ),
            (
                with(8, &2u32.to_le_bytes()),
                Invalid::Version { found: 2 },
                "is patch format version 2; this bakedb-serve reads version 1",
            ),
            (
                with(12, &1000u32.to_le_bytes()),
                Invalid::PageSize { found: 1000 },
                "has page size 1000",
            ),
            (
                with(12, &256u32.to_le_bytes()),
                Invalid::PageSize { found: 256 },
                "expected a power of two from 512 to 65536",
            ),
            (
                with(12, &131072u32.to_le_bytes()),
                Invalid::PageSize { found: 131072 },
                "has page size 131072",
            ),
            (
                with(16, &2000u64.to_le_bytes()),
                Invalid::Length {
                    len: 2000,
                    page_size: 512,
                },
                "not a multiple of its page size 512",
            ),
            (
                with(16, &(512u64 << 32).to_le_bytes()),
                Invalid::TooLong { len: 512 << 32 },
                "more pages than SQLite can address",
            ),
            (
                with(24, &5u64.to_le_bytes()),
                Invalid::TooManyPages { count: 5, pages: 4 },
                "says it holds 5 pages, more than the 4 pages",
            ),
            (
                good[..good.len() - 1].to_vec(),
                Invalid::Size {
                    len: good.len() as u64 - 1,
                    expected: good.len() as u64,
                },
                "is truncated: 1103 bytes, its header says 1104",
            ),
            (
                [good.clone(), vec![0; 3]].concat(),
                Invalid::Size {
                    len: good.len() as u64 + 3,
                    expected: good.len() as u64,
                },
                "3 bytes follow the last page",
            ),
            (
                with(72, &4u64.to_le_bytes()),
                Invalid::PageNumber {
                    index: 1,
                    number: 4,
                    pages: 4,
                },
                "has page number 4 (entry 1), out of range: the composed file has 4 pages",
            ),
            (
                with(72, &1u64.to_le_bytes()),
                Invalid::Order {
                    index: 1,
                    number: 1,
                    previous: 1,
                },
                "page numbers must be strictly increasing",
            ),
        ];
        for (bytes, invalid, message) in cases {
            let e = Header::parse(&bytes).unwrap_err();
            assert_eq!(e, invalid);
            assert!(e.to_string().contains(message), "{e}");
        }
    }

    fn sources(map: &PageMap) -> Vec<Source> {
        (0..map.len() / u64::from(map.page_size()))
            .map(|p| map.source(p))
            .collect()
    }

    use Source::{Base, Zero};
    fn patched(patch: usize, slot: u64) -> Source {
        Source::Patch { patch, slot }
    }

    #[test]
    fn page_map_newest_wins_and_follows_every_length_change() {
        let mut map = PageMap::new(512, 4 * 512).unwrap();
        assert_eq!(sources(&map), [Base, Base, Base, Base]);
        assert_eq!(map.source(4), Zero, "past the end");

        // Page 0 (SQLite's page 1 changes on every commit) and page 2.
        map.apply(4 * 512, [0, 2].into_iter()).unwrap();
        assert_eq!(sources(&map), [patched(0, 0), Base, patched(0, 1), Base]);

        // Grows by two pages, both in the patch, and overrides page 2 again: newest wins.
        map.apply(6 * 512, [0, 2, 4, 5].into_iter()).unwrap();
        assert_eq!(map.len(), 6 * 512);
        assert_eq!(
            sources(&map),
            [
                patched(1, 0),
                Base,
                patched(1, 1),
                Base,
                patched(1, 2),
                patched(1, 3)
            ]
        );

        // Shrinks to two pages (a VACUUM): pages past the new length are gone.
        map.apply(2 * 512, [0].into_iter()).unwrap();
        assert_eq!(map.len(), 2 * 512);
        assert_eq!(sources(&map), [patched(2, 0), Base]);
        assert_eq!(map.source(2), Zero);

        // Grows again listing only page 4: pages 2 and 3 were cut off by the shrink and are
        // zeros now, not the base's or an older patch's (a builder lists them; the map must
        // still compose as the format says).
        map.apply(5 * 512, [0, 4].into_iter()).unwrap();
        assert_eq!(
            sources(&map),
            [patched(3, 0), Base, Zero, Zero, patched(3, 1)]
        );
    }

    #[test]
    fn page_map_of_a_base_cut_inside_a_page_and_of_empty_patches() {
        // A base whose end falls inside page 1 still serves page 1 (the rest is zeros).
        let mut map = PageMap::new(1024, 1500).unwrap();
        assert_eq!(map.source(1), Base);
        assert_eq!(map.source(2), Zero);
        // A patch with no pages keeps every source and only sets the length.
        map.apply(3 * 1024, std::iter::empty()).unwrap();
        assert_eq!(sources(&map), [Base, Base, Zero]);
        map.apply(3 * 1024, [2].into_iter()).unwrap();
        map.apply(3 * 1024, std::iter::empty()).unwrap();
        // Slot counting skips the empty patches: page 2 is entry 0 of patch 1.
        assert_eq!(sources(&map), [Base, Base, patched(1, 0)]);
        let empty = PageMap::new(4096, 0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.source(0), Zero);
    }
}
