import CRocksDB
import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// A thin, thread-safe handle on a RocksDB database through its C API.
///
/// Reads and writes are safe from many threads; `write` and `apply` apply a batch atomically.
public final class RocksDB: @unchecked Sendable {
    private let db: OpaquePointer
    private let readOptions: OpaquePointer
    private let syncWriteOptions: OpaquePointer
    private let asyncWriteOptions: OpaquePointer
    private let unloggedWriteOptions: OpaquePointer
    private let options: OpaquePointer
    public let path: String

    /// RocksDB's write buffer (memtable). The metadata journal checkpoints long before a memtable
    /// this size fills, so RocksDB never writes one out on its own (SPEC.md §3.3).
    public static let writeBufferBytes = 128 << 20
    /// RocksDB's `InfoLogLevel::WARN_LEVEL`.
    static let warnLogLevel: Int32 = 2

    /// Opens (or with `createIfMissing`, creates) the database at `path`. With
    /// `keepMemtablesAtClose`, closing it leaves its memtables unwritten
    /// (`avoid_flush_during_shutdown`): for a store whose unlogged changes a journal of its own
    /// holds (SPEC.md §3.3), so that a close on a full disk never has RocksDB run out of space.
    public init(path: String, createIfMissing: Bool, keepMemtablesAtClose: Bool = false) throws {
        self.path = path
        var options = rocksdb_options_create()!
        rocksdb_options_set_create_if_missing(options, createIfMissing ? 1 : 0)
        rocksdb_options_increase_parallelism(options, 2)
        rocksdb_options_set_max_open_files(options, 512)
        rocksdb_options_set_compression(options, Int32(rocksdb_lz4_compression))
        rocksdb_options_set_write_buffer_size(options, Self.writeBufferBytes)
        // Warnings and errors only in RocksDB's LOG file, which lives on the metadata disk: once
        // a LOG write has failed (a full disk), Debian's build aborts the process at the next
        // line it logs (an assertion in `WritableFileWriter`), and at info level it logs on its
        // own (statistics every 10 minutes, each flush, the close).
        rocksdb_options_set_info_log_level(options, Self.warnLogLevel)
        var error: UnsafeMutablePointer<CChar>? = nil
        if keepMemtablesAtClose {
            // The C API of Debian 12's RocksDB (7.8) has no setter for this DB option.
            let changed = rocksdb_options_create()!
            rocksdb_get_options_from_string(options, "avoid_flush_during_shutdown=true", changed, &error)
            rocksdb_options_destroy(options)
            options = changed
            if let error {
                let message = String(cString: error)
                rocksdb_free(error)
                rocksdb_options_destroy(options)
                throw WeftError(EINVAL, "RocksDB options for \(path): \(message)")
            }
        }
        self.options = options
        let handle = rocksdb_open(options, path, &error)
        if let error {
            let message = String(cString: error)
            rocksdb_free(error)
            rocksdb_options_destroy(options)
            let code: Int32 = message.contains("lock") || message.contains("Resource temporarily unavailable")
                ? EBUSY : RocksDB.errno(forMessage: message)
            throw WeftError(code, "RocksDB open \(path): \(message)")
        }
        db = handle!
        readOptions = rocksdb_readoptions_create()
        syncWriteOptions = rocksdb_writeoptions_create()
        rocksdb_writeoptions_set_sync(syncWriteOptions, 1)
        asyncWriteOptions = rocksdb_writeoptions_create()
        unloggedWriteOptions = rocksdb_writeoptions_create()
        rocksdb_writeoptions_disable_WAL(unloggedWriteOptions, 1)
    }

    deinit {
        rocksdb_close(db)
        rocksdb_readoptions_destroy(readOptions)
        rocksdb_writeoptions_destroy(syncWriteOptions)
        rocksdb_writeoptions_destroy(asyncWriteOptions)
        rocksdb_writeoptions_destroy(unloggedWriteOptions)
        rocksdb_options_destroy(options)
    }

    private static func check(_ error: UnsafeMutablePointer<CChar>?, _ what: String) throws {
        guard let error else { return }
        let message = String(cString: error)
        rocksdb_free(error)
        throw WeftError(errno(forMessage: message), "RocksDB \(what): \(message)")
    }

    /// The errno for a RocksDB error message: ENOSPC for a full file system (RocksDB then
    /// refuses writes until it is reopened, SPEC.md §9.1), EIO for anything else.
    static func errno(forMessage message: String) -> Int32 {
        message.contains("No space left on device") || message.contains("NoSpace") ? ENOSPC : EIO
    }

    public func get(_ key: [UInt8]) throws -> [UInt8]? {
        var length = 0
        var error: UnsafeMutablePointer<CChar>? = nil
        let value = key.withUnsafeBufferPointer { k in
            k.withMemoryRebound(to: CChar.self) { rocksdb_get(db, readOptions, $0.baseAddress, k.count, &length, &error) }
        }
        try Self.check(error, "get")
        guard let value else { return nil }
        defer { rocksdb_free(value) }
        return Array(UnsafeRawBufferPointer(start: value, count: length))
    }

    /// Applies `batch` atomically. With `sync` the WAL is fsynced before returning.
    public func write(_ batch: WriteBatch, sync: Bool) throws {
        var error: UnsafeMutablePointer<CChar>? = nil
        rocksdb_write(db, sync ? syncWriteOptions : asyncWriteOptions, batch.handle, &error)
        try Self.check(error, "write")
    }

    /// Applies `batch` atomically to the memtable only, without RocksDB's WAL: the caller logs it
    /// (the metadata journal). It reaches RocksDB's files at the next `flushMemtables`.
    public func apply(_ batch: WriteBatch) throws {
        var error: UnsafeMutablePointer<CChar>? = nil
        rocksdb_write(db, unloggedWriteOptions, batch.handle, &error)
        try Self.check(error, "write")
    }

    /// `apply` of a batch in RocksDB's serialized form (`WriteBatch.withSerialized`).
    public func apply(serialized: UnsafeRawBufferPointer) throws {
        guard let batch = rocksdb_writebatch_create_from(serialized.baseAddress?.assumingMemoryBound(to: CChar.self),
                                                         serialized.count) else {
            throw WeftError(EIO, "RocksDB: a logged batch does not decode")
        }
        defer { rocksdb_writebatch_destroy(batch) }
        var error: UnsafeMutablePointer<CChar>? = nil
        rocksdb_write(db, unloggedWriteOptions, batch, &error)
        try Self.check(error, "write")
    }

    /// One put (`value` non-nil) or delete of a batch, as `operations(ofSerialized:)` lists them.
    public struct BatchOperation {
        public let key: [UInt8]
        public let value: [UInt8]?
    }

    /// The puts and deletes of a batch in RocksDB's serialized form, in batch order.
    public static func operations(ofSerialized serialized: UnsafeRawBufferPointer) throws -> [BatchOperation] {
        guard let batch = rocksdb_writebatch_create_from(serialized.baseAddress?.assumingMemoryBound(to: CChar.self),
                                                         serialized.count) else {
            throw WeftError(EIO, "RocksDB: a logged batch does not decode")
        }
        defer { rocksdb_writebatch_destroy(batch) }
        final class Collector { var operations: [BatchOperation] = [] }
        let collector = Collector()
        withExtendedLifetime(collector) {
            rocksdb_writebatch_iterate(batch, Unmanaged.passUnretained(collector).toOpaque(), { state, key, keyLength, value, valueLength in
                let collector = Unmanaged<Collector>.fromOpaque(state!).takeUnretainedValue()
                collector.operations.append(BatchOperation(
                    key: Array(UnsafeRawBufferPointer(start: key, count: keyLength)),
                    value: Array(UnsafeRawBufferPointer(start: value, count: valueLength))))
            }, { state, key, keyLength in
                let collector = Unmanaged<Collector>.fromOpaque(state!).takeUnretainedValue()
                collector.operations.append(BatchOperation(key: Array(UnsafeRawBufferPointer(start: key, count: keyLength)),
                                                           value: nil))
            })
        }
        return collector.operations
    }

    /// Writes every memtable out to synced SST files and waits until they are part of the
    /// database.
    public func flushMemtables() throws {
        let flushOptions = rocksdb_flushoptions_create()!
        defer { rocksdb_flushoptions_destroy(flushOptions) }
        rocksdb_flushoptions_set_wait(flushOptions, 1)
        var error: UnsafeMutablePointer<CChar>? = nil
        rocksdb_flush(db, flushOptions, &error)
        try Self.check(error, "flush")
    }

    /// Whether a flush or compaction is running or due (RocksDB's own properties).
    public var backgroundWorkPending: Bool {
        var running: UInt64 = 0, flushing: UInt64 = 0, pending: UInt64 = 0
        _ = rocksdb_property_int(db, "rocksdb.num-running-compactions", &running)
        _ = rocksdb_property_int(db, "rocksdb.num-running-flushes", &flushing)
        _ = rocksdb_property_int(db, "rocksdb.compaction-pending", &pending)
        return running + flushing + pending > 0
    }

    /// Bytes free to this process on the file system that holds the database (`statvfs`), nil
    /// if that cannot be asked.
    public var freeBytes: UInt64? { Self.freeBytes(at: path) }

    /// Bytes free to this process on the file system that holds `path` (`statvfs`), nil if that
    /// cannot be asked.
    public static func freeBytes(at path: String) -> UInt64? {
        var disk = statvfs()
        guard statvfs(path, &disk) == 0 else { return nil }
        return UInt64(disk.f_bavail) * UInt64(disk.f_frsize)
    }

    /// RocksDB's estimate of the bytes its compactions have yet to rewrite
    /// (`rocksdb.estimate-pending-compaction-bytes`).
    public var pendingCompactionBytes: UInt64 {
        var value: UInt64 = 0
        return rocksdb_property_int(db, "rocksdb.estimate-pending-compaction-bytes", &value) == 0 ? value : 0
    }

    /// Bytes of the database's table files (`rocksdb.total-sst-files-size`).
    public var tableFileBytes: UInt64 {
        var value: UInt64 = 0
        return rocksdb_property_int(db, "rocksdb.total-sst-files-size", &value) == 0 ? value : 0
    }

    /// Bytes held by the active memtable (RocksDB's `rocksdb.cur-size-active-mem-table`).
    public var activeMemtableBytes: UInt64 {
        var value: UInt64 = 0
        return rocksdb_property_int(db, "rocksdb.cur-size-active-mem-table", &value) == 0 ? value : 0
    }

    /// Visits keys starting with `prefix`, in byte order, from `start` (inclusive; defaults to the
    /// prefix). `body` returns false to stop. Iteration sees one consistent snapshot.
    public func scan(prefix: [UInt8], from start: [UInt8]? = nil,
                     _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
        let options = rocksdb_readoptions_create()!
        defer { rocksdb_readoptions_destroy(options) }
        var upper = prefix
        // Upper bound: the prefix incremented as a big-endian number (prefixes here never end in 0xff runs only).
        while let last = upper.last, last == 0xff { upper.removeLast() }
        if !upper.isEmpty { upper[upper.count - 1] += 1 }
        try upper.withUnsafeBufferPointer { upperBytes in
            if !upperBytes.isEmpty {
                upperBytes.withMemoryRebound(to: CChar.self) {
                    rocksdb_readoptions_set_iterate_upper_bound(options, $0.baseAddress, upperBytes.count)
                }
            }
            let iterator = rocksdb_create_iterator(db, options)!
            defer { rocksdb_iter_destroy(iterator) }
            let seekKey = start ?? prefix
            seekKey.withUnsafeBufferPointer { k in
                k.withMemoryRebound(to: CChar.self) { rocksdb_iter_seek(iterator, $0.baseAddress, k.count) }
            }
            while rocksdb_iter_valid(iterator) != 0 {
                var keyLength = 0, valueLength = 0
                let key = rocksdb_iter_key(iterator, &keyLength)
                let value = rocksdb_iter_value(iterator, &valueLength)
                let keyBytes = UnsafeRawBufferPointer(start: key, count: keyLength)
                if keyLength < prefix.count || !prefix.withUnsafeBytes({ $0.elementsEqual(keyBytes.prefix(prefix.count)) }) {
                    break
                }
                if try !body(keyBytes, UnsafeRawBufferPointer(start: value, count: valueLength)) { break }
                rocksdb_iter_next(iterator)
            }
            var error: UnsafeMutablePointer<CChar>? = nil
            rocksdb_iter_get_error(iterator, &error)
            try Self.check(error, "iterate")
        }
    }
}

/// A set of puts and deletes applied atomically by `RocksDB.write`.
public final class WriteBatch {
    let handle: OpaquePointer
    public private(set) var count = 0

    public init() { handle = rocksdb_writebatch_create() }

    /// Bytes of the batch in RocksDB's serialized form.
    public var byteCount: Int { withSerialized { $0.count } }
    deinit { rocksdb_writebatch_destroy(handle) }

    /// Calls `body` with the batch in RocksDB's serialized form (valid only during the call).
    public func withSerialized<T>(_ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        var size = 0
        let data = rocksdb_writebatch_data(handle, &size)
        return try body(UnsafeRawBufferPointer(start: data, count: size))
    }

    public func put(_ key: [UInt8], _ value: [UInt8]) {
        key.withUnsafeBufferPointer { k in
            value.withUnsafeBufferPointer { v in
                k.withMemoryRebound(to: CChar.self) { kp in
                    v.withMemoryRebound(to: CChar.self) { vp in
                        rocksdb_writebatch_put(handle, kp.baseAddress, k.count, vp.baseAddress, v.count)
                    }
                }
            }
        }
        count += 1
    }

    public func delete(_ key: [UInt8]) {
        key.withUnsafeBufferPointer { k in
            k.withMemoryRebound(to: CChar.self) { rocksdb_writebatch_delete(handle, $0.baseAddress, k.count) }
        }
        count += 1
    }
}
