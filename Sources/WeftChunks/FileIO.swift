#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// Thin, retrying wrappers over the POSIX calls the chunk store uses. They report `errno`
/// unchanged; the store decides the errno its callers see and logs the cause.
enum FileIO {
    struct Failure: Error, CustomStringConvertible {
        var call: String
        var errno: Int32
        var description: String { "\(call): \(String(cString: strerror(errno)))" }
    }

    /// Object `id` lives at `<fan-out>/<name>`: the fan-out directory is the id's low byte in
    /// two hex digits, the name its 16 hex digits. Calls `body` with the relative C path.
    @inline(__always)
    static func withObjectPath<T>(_ id: SliceID, suffix: UInt32? = nil, _ body: (UnsafePointer<CChar>) throws -> T)
        rethrows -> T
    {
        // "ab/0123456789abcdef" + optional ".0123abcd.tmp" + NUL
        try withUnsafeTemporaryAllocation(of: CChar.self, capacity: 40) { buffer in
            let digits: StaticString = "0123456789abcdef"
            let table = digits.utf8Start
            var at = 0
            func put(_ byte: UInt8) { buffer[at] = CChar(bitPattern: byte); at += 1 }
            put(table[Int((id >> 4) & 0xF)])
            put(table[Int(id & 0xF)])
            put(UInt8(ascii: "/"))
            for shift in stride(from: 60, through: 0, by: -4) { put(table[Int((id >> UInt64(shift)) & 0xF)]) }
            if let suffix {
                put(UInt8(ascii: "."))
                for shift in stride(from: 28, through: 0, by: -4) { put(table[Int((suffix >> UInt32(shift)) & 0xF)]) }
                for byte in ".tmp".utf8 { put(byte) }
            }
            buffer[at] = 0
            return try body(buffer.baseAddress!)
        }
    }

    static func fanOutName(_ index: Int) -> String {
        let digits = String(index, radix: 16)
        return digits.count == 1 ? "0" + digits : digits
    }

    /// Reads exactly `count` bytes at `offset` unless the file ends first; returns bytes read.
    static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: Int) throws(Failure)
        -> Int
    {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n == 0 {
                break
            } else if errno != EINTR {
                throw Failure(call: "pread", errno: errno)
            }
        }
        return done
    }

    /// Writes all of `bytes` at `offset`, finishing short writes.
    static func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(Failure) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n == 0 {
                throw Failure(call: "pwrite", errno: EIO)
            } else if errno != EINTR {
                throw Failure(call: "pwrite", errno: errno)
            }
        }
    }

    /// IOV_MAX on Linux.
    static let maxSegmentsPerWrite = 1024

    /// Writes `parts` back to back from offset 0: one `writev` in the common case, finishing
    /// a short write (or more than `maxSegmentsPerWrite` parts) with further calls.
    static func writeFully(_ fd: Int32, _ parts: [UnsafeRawBufferPointer]) throws(Failure) {
        let total = parts.reduce(0) { $0 + $1.count }
        var written = 0
        var iovecs = parts.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        while !iovecs.isEmpty {
            let n = writev(fd, &iovecs, Int32(min(iovecs.count, maxSegmentsPerWrite)))
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure(call: "writev", errno: errno)
            }
            if n == 0 { throw Failure(call: "writev", errno: EIO) }
            written += n
            if written == total { return }
            // Drop what was written and retry with the rest.
            var skip = n
            while skip > 0 {
                if skip >= iovecs[0].iov_len {
                    skip -= iovecs[0].iov_len
                    iovecs.removeFirst()
                } else {
                    iovecs[0].iov_base = iovecs[0].iov_base! + skip
                    iovecs[0].iov_len -= skip
                    skip = 0
                }
            }
        }
    }

    static func fsyncRetrying(_ fd: Int32) throws(Failure) {
        while fsync(fd) != 0 {
            if errno != EINTR { throw Failure(call: "fsync", errno: errno) }
        }
    }

    static func fileBytes(_ fd: Int32) throws(Failure) -> Int {
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw Failure(call: "fstat", errno: errno) }
        return Int(info.st_size)
    }

    /// Creates `path` and any missing parents, like `mkdir -p`, and fsyncs the parent of each
    /// directory it creates so the new entries survive a crash.
    static func makeDirectories(_ path: String) throws(Failure) {
        var prefix = path.hasPrefix("/") ? "/" : ""
        var parent = prefix.isEmpty ? "." : prefix
        for component in path.split(separator: "/") {
            prefix += component
            if mkdir(prefix, 0o755) == 0 {
                let fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                guard fd >= 0 else { throw Failure(call: "open \(parent)", errno: errno) }
                defer { close(fd) }
                try fsyncRetrying(fd)
            } else if errno != EEXIST {
                throw Failure(call: "mkdir \(prefix)", errno: errno)
            }
            parent = prefix
            prefix += "/"
        }
    }

    /// Calls `body` with each name in directory `relativePath` (under `root`), excluding "." and "..".
    static func forEachName(in root: Int32, _ relativePath: String, _ body: (UnsafePointer<CChar>, Int32) throws -> Void)
        throws
    {
        let fd = openat(root, relativePath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure(call: "open \(relativePath)", errno: errno) }
        guard let directory = fdopendir(fd) else {
            let error = errno
            close(fd)
            throw Failure(call: "fdopendir \(relativePath)", errno: error)
        }
        defer { closedir(directory) }
        let directoryFD = dirfd(directory)
        while true {
            errno = 0
            guard let entry = readdir(directory) else {
                if errno != 0 { throw Failure(call: "readdir \(relativePath)", errno: errno) }
                return
            }
            try withUnsafePointer(to: &entry.pointee.d_name) { tuple in
                try tuple.withMemoryRebound(to: CChar.self, capacity: 256) { name in
                    if name[0] == 0x2E && (name[1] == 0 || (name[1] == 0x2E && name[2] == 0)) { return }
                    try body(name, directoryFD)
                }
            }
        }
    }

    /// Parses a 16-digit lower-case hex object name; nil for anything else.
    static func parseObjectName(_ name: UnsafePointer<CChar>) -> SliceID? {
        guard let id = parseHex(name, digits: 16) else { return nil }
        return name[16] == 0 ? id : nil
    }

    /// The object id and suffix of a temporary name, "0123456789abcdef.0123abcd.tmp".
    static func parseTemporaryName(_ name: UnsafePointer<CChar>) -> (id: SliceID, suffix: UInt32)? {
        guard strlen(name) == 29, let id = parseHex(name, digits: 16), name[16] == CChar(UInt8(ascii: ".")),
              let suffix = parseHex(name + 17, digits: 8), strcmp(name + 25, ".tmp") == 0 else { return nil }
        return (id, UInt32(suffix))
    }

    /// The value of the first `digits` lowercase hexadecimal digits of `name`; nil if one is not.
    private static func parseHex(_ name: UnsafePointer<CChar>, digits: Int) -> UInt64? {
        var value: UInt64 = 0
        for index in 0..<digits {
            let c = UInt8(bitPattern: name[index])
            let digit: UInt64
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt64(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt64(c - UInt8(ascii: "a") + 10)
            default: return nil
            }
            value = value << 4 | digit
        }
        return value
    }

    static func hasTemporarySuffix(_ name: UnsafePointer<CChar>) -> Bool {
        let length = strlen(name)
        return length > 4 && strcmp(name + length - 4, ".tmp") == 0
    }
}
