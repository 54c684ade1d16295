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
