import CWeftSupport
@_spi(CustomByteBufferAllocator) import NIOCore

/// The process-wide caching allocator for transfer buffers (SPEC.md §4, Bulk transfers).
///
/// Every channel of the agent and the hub allocates its `ByteBuffer`s here: a stream of 4 MiB
/// frames then reuses memory it already touched instead of faulting in fresh pages each time.
/// Blocks of 64 KiB and more are page-aligned.
public enum BulkMemory {
    /// Blocks of 64 KiB and more start on a page of this size.
    static let pageBytes = 4096

    /// The allocator channels use (`ChannelOptions.allocator`).
    public static let allocator = ByteBufferAllocator(
        allocate: { weft_bulk_allocate($0) },
        reallocate: { weft_bulk_reallocate($0, $1, $2) },
        deallocate: { weft_bulk_free($0) },
        copy: { weft_bulk_copy($0, $1, $2) })

    /// Bytes of freed blocks kept for reuse. The agent keeps the default 64 MiB (part of its
    /// fixed overhead); weftd raises it.
    public static func setCacheLimit(bytes: Int) {
        weft_bulk_set_cache_limit(bytes)
    }

    /// Large blocks mapped fresh and served from the cache so far, and the bytes cached now.
    public static var statistics: (mapped: UInt64, reused: UInt64, cachedBytes: UInt64) {
        let stats = weft_bulk_stats()
        return (stats.mapped, stats.reused, stats.cached_bytes)
    }
}
