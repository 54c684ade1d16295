#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport

/// Memory that O_DIRECT transfers read into or write from, each block its own mapping,
/// 2 MiB-aligned (SPEC.md §7, "Slabs and write buffers are mapped for huge pages"): cache slabs
/// (`SlabPool`) and pooled write buffers (`BufferPool`).
enum LargePages {
    /// The huge page size the mappings are aligned to and advised by.
    static let bytes = 2 << 20

    /// `size` bytes, advised for huge pages at once (`advised`) or left for `advise`. Running
    /// out of address space is fatal, as it is for any allocation; `purpose` names the memory.
    static func map(_ size: Int, advised: Bool, for purpose: String) -> UnsafeMutableRawPointer {
        guard let pointer = advised ? weft_pages_map(size) : weft_pages_map_unadvised(size) else {
            fatalError("cannot map \(size) bytes of \(purpose): \(String(cString: strerror(errno)))")
        }
        return pointer
    }

    /// Advises `size` bytes at `pointer`, inside a mapping of `map`, for huge pages.
    static func advise(_ pointer: UnsafeMutableRawPointer, _ size: Int) { weft_pages_advise(pointer, size) }

    static func unmap(_ pointer: UnsafeMutableRawPointer, _ size: Int) { weft_pages_unmap(pointer, size) }
}
