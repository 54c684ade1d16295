#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Foundation
import WeftProto

/// The sockets Weft makes itself, to keep a duplicate for direct sends (SPEC.md §4, Direct sends).
enum Sockets {
    /// Why a connection could not be made, in words for "hub X does not answer (…)".
    struct ConnectFailure: Error {
        let reason: String
    }

    /// A connected, non-blocking stream socket to `address` within `timeoutMs` (resolution
    /// included). TCP sockets get TCP_NODELAY and SO_KEEPALIVE.
    static func connect(_ address: HubAddress, timeoutMs: Int) throws -> Int32 {
        let deadlineNs = MonotonicClock.deadlineNs(afterMs: timeoutMs)
        switch address {
        case let .unix(path):
            guard var storage = unixSocketAddress(path) else { throw ConnectFailure(reason: "socket path too long") }
            return try withUnsafeBytes(of: &storage) { raw in
                try connect(family: AF_UNIX, address: raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                            length: socklen_t(MemoryLayout<sockaddr_un>.size), deadlineNs: deadlineNs,
                            timeoutMs: timeoutMs)
            }
        case let .tcp(host, port):
            let candidates = try resolve(host: host, port: port, deadlineNs: deadlineNs, timeoutMs: timeoutMs)
            var lastFailure = ConnectFailure(reason: "no address for \(host)")
            for candidate in candidates {
                do {
                    let descriptor = try candidate.withUnsafeBytes { raw in
                        try connect(family: Int32(raw.load(as: sockaddr.self).sa_family),
                                    address: raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                                    length: socklen_t(raw.count), deadlineNs: deadlineNs, timeoutMs: timeoutMs)
                    }
                    var one: Int32 = 1
                    setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                    setsockopt(descriptor, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
                    return descriptor
                } catch let failure as ConnectFailure {
                    lastFailure = failure
                    if MonotonicClock.nowNs() >= deadlineNs { break }
                }
            }
            throw lastFailure
        }
    }

    /// One non-blocking connect, waited for with poll until `deadlineNs`.
    private static func connect(family: Int32, address: UnsafePointer<sockaddr>, length: socklen_t,
                                deadlineNs: UInt64, timeoutMs: Int) throws -> Int32 {
        let descriptor = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw ConnectFailure(reason: String(cString: strerror(errno))) }
        var rc = Glibc.connect(descriptor, address, length)
        while rc != 0 && errno == EINTR { rc = Glibc.connect(descriptor, address, length) }
        if rc == 0 { return descriptor }
        // (For a Unix socket EAGAIN means the hub's backlog is full: no connection under way.)
        guard errno == EINPROGRESS else {
            let reason = String(cString: strerror(errno))
            Glibc.close(descriptor)
            throw ConnectFailure(reason: reason)
        }
        while true {
            let now = MonotonicClock.nowNs()
            guard now < deadlineNs else {
                Glibc.close(descriptor)
                throw ConnectFailure(reason: "no connection within \(timeoutMs) ms")
            }
            var waiter = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
            let waitMs = Int32(min((deadlineNs - now + 999_999) / 1_000_000, UInt64(Int32.max)))
            let ready = poll(&waiter, 1, waitMs)
            if ready < 0 && errno != EINTR {
                let reason = String(cString: strerror(errno))
                Glibc.close(descriptor)
                throw ConnectFailure(reason: reason)
            }
            if ready <= 0 { continue }
            var error: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(descriptor, SOL_SOCKET, SO_ERROR, &error, &size)
            if error == 0 { return descriptor }
            Glibc.close(descriptor)
            throw ConnectFailure(reason: String(cString: strerror(error)))
        }
    }

    /// The addresses of `host`: a numeric one at once, a name through getaddrinfo on a helper
    /// thread, awaited until `deadlineNs`.
    private static func resolve(host: String, port: Int, deadlineNs: UInt64, timeoutMs: Int,
                                passive: Bool = false) throws -> [[UInt8]] {
        final class Answer: @unchecked Sendable {
            let lock = PthreadMutex()
            let done = ConditionVariable()
            var result: Result<[[UInt8]], ConnectFailure>?
        }
        let answer = Answer()
        let numeric = isNumeric(host)
        let lookup: @Sendable () -> Void = {
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            // AI_ADDRCONFIG for names only: it would drop 127.0.0.1 on a host with loopback alone.
            hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0) | (numeric ? AI_NUMERICHOST : AI_ADDRCONFIG)
            var list: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &list)
            let result: Result<[[UInt8]], ConnectFailure>
            if rc != 0 {
                result = .failure(ConnectFailure(reason: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))"))
            } else {
                var addresses: [[UInt8]] = []
                var entry = list
                while let current = entry {
                    if let address = current.pointee.ai_addr {
                        addresses.append(Array(UnsafeRawBufferPointer(start: address, count: Int(current.pointee.ai_addrlen))))
                    }
                    entry = current.pointee.ai_next
                }
                freeaddrinfo(list)
                result = .success(addresses)
            }
            answer.lock.withLock {
                answer.result = result
                answer.done.broadcast()
            }
        }
        if numeric {
            lookup()
        } else {
            WorkerPool.detach(lookup)
        }
        return try answer.lock.withLock {
            while answer.result == nil {
                if !answer.done.wait(answer.lock, deadlineNs: deadlineNs), answer.result == nil {
                    throw ConnectFailure(reason: "cannot resolve \(host) within \(timeoutMs) ms")
                }
            }
            return try answer.result!.get()
        }
    }

    /// A listening TCP socket on `host:port` (port 0: any free port), and the port it got.
    /// Throws WeftError with the errno of the failing call.
    static func listen(host: String, port: Int, backlog: Int32) throws -> (descriptor: Int32, port: Int) {
        let candidates: [[UInt8]]
        do {
            candidates = try resolve(host: host, port: port, deadlineNs: MonotonicClock.deadlineNs(afterMs: 10_000),
                                     timeoutMs: 10_000, passive: true)
        } catch let failure as ConnectFailure {
            throw WeftError(EADDRNOTAVAIL, failure.reason)
        }
        guard !candidates.isEmpty else { throw WeftError(EADDRNOTAVAIL, "no address for \(host)") }
        // The first address that binds (as a name may give an IPv6 address this host cannot use).
        var lastError: Error = WeftError(EADDRNOTAVAIL, "no address for \(host)")
        for candidate in candidates {
            do {
                return try listen(candidate, backlog: backlog)
            } catch let error as WeftError where error.errno != EADDRINUSE {
                lastError = error
            }
        }
        throw lastError
    }

    private static func listen(_ candidate: [UInt8], backlog: Int32) throws -> (descriptor: Int32, port: Int) {
        try candidate.withUnsafeBytes { raw in
            let family = Int32(raw.load(as: sockaddr.self).sa_family)
            let descriptor = try listening(family: family, address: raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                                           length: socklen_t(raw.count), backlog: backlog, reuseAddress: true)
            var bound = sockaddr_storage()
            var size = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let boundPort: Int = withUnsafeMutablePointer(to: &bound) { pointer in
                _ = pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &size) }
                if family == AF_INET6 {
                    return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
                }
                return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
            }
            return (descriptor, boundPort)
        }
    }

    /// A listening Unix socket at `path`; a stale socket file there is replaced (any other file
    /// is left alone: EADDRINUSE).
    static func listen(unixPath path: String, backlog: Int32) throws -> Int32 {
        var status = stat()
        if lstat(path, &status) == 0 {
            guard (status.st_mode & S_IFMT) == S_IFSOCK else {
                throw WeftError(EADDRINUSE, "\(path) exists and is not a socket")
            }
            unlink(path)
        }
        guard var storage = unixSocketAddress(path) else { throw WeftError(ENAMETOOLONG, "socket path \(path) is too long") }
        return try withUnsafeBytes(of: &storage) { raw in
            try listening(family: AF_UNIX, address: raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                          length: socklen_t(MemoryLayout<sockaddr_un>.size), backlog: backlog, reuseAddress: false)
        }
    }

    private static func listening(family: Int32, address: UnsafePointer<sockaddr>, length: socklen_t,
                                  backlog: Int32, reuseAddress: Bool) throws -> Int32 {
        let descriptor = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw WeftError(errno, "socket: \(String(cString: strerror(errno)))") }
        if reuseAddress {
            var one: Int32 = 1
            setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        guard bind(descriptor, address, length) == 0, Glibc.listen(descriptor, backlog) == 0 else {
            let error = WeftError(errno, String(cString: strerror(errno)))
            Glibc.close(descriptor)
            throw error
        }
        return descriptor
    }

    /// The next connection on `listener` (close-on-exec); nil once `stopping()` says so (the
    /// listener was shut down) or on an error that is not the peer's or passing. Retries
    /// interruptions, network errors that accept(2) passes on from the new connection, and a
    /// full descriptor table (after a pause, so that it does not spin). TCP connections get
    /// TCP_NODELAY and SO_KEEPALIVE, as `connect`'s do.
    static func accept(_ listener: Int32, stopping: () -> Bool) -> Result<Int32, WeftError>? {
        while true {
            let descriptor = weft_accept_cloexec(listener)
            if descriptor >= 0 {
                // Small frames go out at once (no Nagle delay behind an unacknowledged one). On a
                // Unix socket these fail (EOPNOTSUPP), harmlessly.
                var one: Int32 = 1
                setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                setsockopt(descriptor, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
                return .success(descriptor)
            }
            let error = errno
            if stopping() { return nil }
            switch error {
            case EINTR, ECONNABORTED, EPROTO, ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
                 ENETUNREACH, EPERM:
                continue
            case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                usleep(10_000)
            default:
                return .failure(WeftError(error, "accept: \(String(cString: strerror(error)))"))
            }
        }
    }

    /// Sets the socket's send buffer (`SO_SNDBUF`; tests make it small to fill it at once).
    static func setSendBuffer(_ descriptor: Int32, bytes: Int?) {
        guard var value = bytes.map(Int32.init) else { return }
        setsockopt(descriptor, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Receives until `buffer` is full, the peer closes, an error, or `deadlineNs`
    /// (`MonotonicClock`) passes; returns the bytes received.
    static func receiveFully(_ descriptor: Int32, _ buffer: UnsafeMutableRawBufferPointer, deadlineNs: UInt64) -> Int {
        var done = 0
        while done < buffer.count {
            let now = MonotonicClock.nowNs()
            guard now < deadlineNs else { break }
            var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(clamping: max(1, (deadlineNs - now) / 1_000_000)))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { break }
            let got = recv(descriptor, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_DONTWAIT))
            if got > 0 {
                done += got
            } else if got < 0 && (errno == EINTR || errno == EAGAIN) {
                continue
            } else {
                break
            }
        }
        return done
    }

    /// A duplicate of `descriptor` that a child process does not inherit.
    static func duplicate(_ descriptor: Int32) -> Int32 {
        fcntl(descriptor, F_DUPFD_CLOEXEC, 0)
    }

    /// The peer of a connected socket for log lines: `[v4]:port`-style text for TCP, "unix peer"
    /// for a Unix socket, "unknown peer" if the system cannot say.
    static func peerName(_ descriptor: Int32) -> String {
        name(descriptor, peer: true)
    }

    /// This end of a connected socket, in `peerName`'s form (co-located reads compare the two:
    /// SPEC.md §4).
    static func localName(_ descriptor: Int32) -> String {
        name(descriptor, peer: false)
    }

    private static func name(_ descriptor: Int32, peer: Bool) -> String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                peer ? getpeername(descriptor, $0, &length) : getsockname(descriptor, $0, &length)
            }
        }
        guard rc == 0 else { return "unknown peer" }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { address in
                    var ip = address.pointee.sin_addr
                    inet_ntop(AF_INET, &ip, &text, socklen_t(text.count))
                    return "\(String(cString: text)):\(UInt16(bigEndian: address.pointee.sin_port))"
                }
            }
        case AF_INET6:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { address in
                    var ip = address.pointee.sin6_addr
                    let port = UInt16(bigEndian: address.pointee.sin6_port)
                    let bytes = withUnsafeBytes(of: &ip) { Array($0) }
                    if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF {
                        // An IPv4 peer of a dual-stack socket (::ffff:a.b.c.d), as an IPv4 socket names it.
                        var v4 = in_addr()
                        withUnsafeMutableBytes(of: &v4) { $0.copyBytes(from: bytes[12..<16]) }
                        inet_ntop(AF_INET, &v4, &text, socklen_t(text.count))
                        return "\(String(cString: text)):\(port)"
                    }
                    inet_ntop(AF_INET6, &ip, &text, socklen_t(text.count))
                    return "[\(String(cString: text))]:\(port)"
                }
            }
        case AF_UNIX:
            return "unix peer"
        default:
            return "unknown peer"
        }
    }

    private static func isNumeric(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}

/// Per-process limits a hub daemon and an agent need.
public enum ProcessLimits {
    /// Raises the soft limit of open files to the hard one: a hub keeps up to 512 objects open,
    /// each with a second (O_DIRECT) descriptor once its spans are read direct (SPEC.md §4, Hub
    /// read cache), beside its agents' sockets, and 1,024 is a common soft limit. Returns the
    /// soft limit now (nil: unlimited or unknown).
    @discardableResult
    public static func raiseOpenFileLimit() -> Int? {
        let limit = weft_raise_open_file_limit()
        return limit < 0 ? nil : limit
    }
}
