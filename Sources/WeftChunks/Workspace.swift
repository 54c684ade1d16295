import CZstd
import WeftProto

/// Per-operation scratch memory: one stored block, one raw block and the zstd contexts.
///
/// Borrowed from a `WorkspacePool` for the length of one read, verify or write, so a hot path
/// allocates nothing per block.
final class Workspace {
    /// Holds one stored (possibly compressed) block payload.
    let stored: UnsafeMutableRawBufferPointer
    /// Holds one raw block when the caller's buffer does not cover the whole block.
    let raw: UnsafeMutableRawBufferPointer
    private var decompressionContext: OpaquePointer?
    private var compressionContext: OpaquePointer?

    init() {
        stored = .allocate(byteCount: ChunkFormat.blockSizeBytes, alignment: 64)
        raw = .allocate(byteCount: ChunkFormat.blockSizeBytes, alignment: 64)
    }

    deinit {
        stored.deallocate()
        raw.deallocate()
        if let decompressionContext { ZSTD_freeDCtx(decompressionContext) }
        if let compressionContext { ZSTD_freeCCtx(compressionContext) }
    }

    /// Decompresses one zstd frame into `destination`; returns the decompressed size, or nil
    /// when the frame is malformed or does not fit.
    func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        if decompressionContext == nil {
            decompressionContext = ZSTD_createDCtx()
            precondition(decompressionContext != nil, "ZSTD_createDCtx failed")
        }
        let result = ZSTD_decompressDCtx(decompressionContext, destination.baseAddress, destination.count,
                                         source.baseAddress, source.count)
        return ZSTD_isError(result) != 0 ? nil : result
    }

    /// Compresses `source` into `destination`; returns the compressed size, or nil when the
    /// result would not fit (the block is then stored raw).
    func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        if compressionContext == nil {
            compressionContext = ZSTD_createCCtx()
            precondition(compressionContext != nil, "ZSTD_createCCtx failed")
        }
        let result = ZSTD_compressCCtx(compressionContext, destination.baseAddress, destination.count,
                                       source.baseAddress, source.count, ChunkFormat.zstdLevel)
        return ZSTD_isError(result) != 0 ? nil : result
    }
}

/// A bounded free list of workspaces. At most `maxIdle` are kept; beyond that a returned
/// workspace is freed, so memory stays bounded while busy threads never wait for one.
final class WorkspacePool: @unchecked Sendable {
    static let maxIdle = 16
    private let lock = Lock()
    private var idle: [Workspace] = []

    init() { idle.reserveCapacity(Self.maxIdle) }

    func acquire() -> Workspace {
        lock.withLock { idle.popLast() } ?? Workspace()
    }

    func release(_ workspace: Workspace) {
        lock.withLock {
            if idle.count < Self.maxIdle { idle.append(workspace) }
        }
    }

    func with<T>(_ body: (Workspace) throws -> T) rethrows -> T {
        let workspace = acquire()
        defer { release(workspace) }
        return try body(workspace)
    }
}

/// Page-aligned buffers in which compressed objects are assembled before they are written
/// (SPEC.md §3.1, Compression rule), one free list per process. Reused so that a stream of
/// compressed objects writes from memory it has touched before: on these VMs a fresh page
/// costs more than compressing it. At most `maxIdle` buffers of at most `maxPooledBytes` each
/// are kept, the largest ones: a take gets the smallest idle buffer that fits, and a buffer
/// given back to a full list replaces the smallest idle one if it is larger (so small objects'
/// images never crowd out the chunk-sized ones a stream of large objects needs).
final class ImagePool: @unchecked Sendable {
    static let shared = ImagePool()
    static let maxIdle = 4
    static let maxPooledBytes = 16 << 20
    private let lock = Lock()
    private var idle: [UnsafeMutableRawBufferPointer] = []

    /// A buffer of at least `byteCount` bytes (rounded up to whole pages), page-aligned.
    func take(byteCount: Int) -> UnsafeMutableRawBufferPointer {
        let alignment = ChunkFormat.directAlignment
        let capacity = (byteCount + alignment - 1) / alignment * alignment
        let pooled: UnsafeMutableRawBufferPointer? = lock.withLock {
            let fitting = idle.indices.filter { idle[$0].count >= capacity }
            guard let best = fitting.min(by: { idle[$0].count < idle[$1].count }) else { return nil }
            return idle.remove(at: best)
        }
        return pooled ?? .allocate(byteCount: max(capacity, alignment), alignment: alignment)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard buffer.count <= Self.maxPooledBytes else { return buffer.deallocate() }
        let freed: UnsafeMutableRawBufferPointer? = lock.withLock {
            if idle.count < Self.maxIdle {
                idle.append(buffer)
                return nil
            }
            guard let smallest = idle.indices.min(by: { idle[$0].count < idle[$1].count }),
                  idle[smallest].count < buffer.count else { return buffer }
            let replaced = idle[smallest]
            idle[smallest] = buffer
            return replaced
        }
        freed?.deallocate()
    }

    /// The sizes of the idle buffers (tests).
    var idleSizes: [Int] { lock.withLock { idle.map(\.count).sorted() } }
}
